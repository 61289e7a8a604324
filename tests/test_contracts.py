"""spinedxa.contracts: each file format's reader rejects missing columns and bad values naming the file; writers are
byte-stable (same content, whatever the row order, gives the same bytes); 16-bit PNGs round-trip exactly."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from spinedxa.contracts import augmented, jsonfile, manifest, png16, predictions, splits, table

# ------------------------------------------------------------------------------------------------ fixtures


def splits_frame() -> pd.DataFrame:
    """Two scans of two patients in two folds (each scan test in one of them)."""
    rows = []
    for fold in (0, 1):
        for i, (label, pid) in enumerate((("normal", "P" + "a" * 12), ("osteoporosis", "P" + "b" * 12))):
            sha = f"{i:064x}"
            rows.append({"source": f"{label}/s{i}.dcm", "sha256": sha, "patient_id": pid, "label": label,
                         "image": f"images/{sha[:16]}.png", "roi": f"roi/{sha[:16]}.png", "fold": fold,
                         "split": "test" if i == fold else "train"})
    return pd.DataFrame(rows)


def predictions_frame() -> pd.DataFrame:
    prob = [0.9, 0.1234567890123, 0.5]
    return pd.DataFrame({
        "source": ["b.dcm", "a.dcm", "c.dcm"], "patient_id": ["P1", "P2", "P2"], "fold": [0, 1, 1],
        "label": ["osteoporosis", "normal", "normal"], "y_true": [1, 0, 0], "prob": prob,
        "pred": [1, 0, 1], "actual": ["osteoporosis", "normal", "normal"],
        "predicted": ["osteoporosis", "normal", "osteoporosis"],
        "prob_normal": [1 - p for p in prob], "prob_osteoporosis": prob,
    })


def augmented_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "image": ["images/bb_aug2.png", "images/bb_aug1.png", "images/aa_aug1.png"],
        "parent_source": ["b.dcm", "b.dcm", "a.dcm"], "parent_sha256": ["bb", "bb", "aa"],
        "parent_image": ["roi/bb.png", "roi/bb.png", "roi/aa.png"], "patient_id": ["P1", "P1", "P2"],
        "label": ["normal", "normal", "osteoporosis"], "k": [2, 1, 1],
    })


def manifest_frame() -> pd.DataFrame:
    frame = pd.DataFrame({c: ["", ""] for c in manifest.COLUMNS})
    frame["source"] = ["z.dcm", "a.dcm"]
    frame["status"] = ["accepted", "quarantined"]
    frame["reason"] = ["", "zero_byte: file is empty"]
    frame["label"] = ["normal", "normal"]
    return frame


# (module, frame factory, the sort order its writer promises)
WRITERS = {
    "manifest": (manifest, manifest_frame, ["source"]),
    "splits": (splits, splits_frame, ["fold", "source"]),
    "augmented": (augmented, augmented_frame, ["parent_source", "k"]),
    "predictions": (predictions, predictions_frame, ["source"]),
}


# ------------------------------------------------------------------------------------------------ writers


@pytest.mark.parametrize("name", WRITERS)
def test_writers_are_byte_stable_sorted_and_round_trip(tmp_path: Path, name: str) -> None:
    module, make, order = WRITERS[name]
    frame = make()
    first, second, shuffled = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    module.write(first, frame)
    module.write(second, frame)
    module.write(shuffled, frame.sample(frac=1.0, random_state=3).iloc[:, ::-1])  # other row and column order
    assert first.read_bytes() == second.read_bytes() == shuffled.read_bytes()
    assert b"\r\n" not in first.read_bytes()
    back = module.read(first)
    extra = ["prob_normal", "prob_osteoporosis"] if module is predictions else []  # one column per class
    assert list(back.columns) == [*module.COLUMNS, *extra]
    expected = frame.sort_values(order, kind="stable").reset_index(drop=True)
    assert list(back["source" if "source" in back else "image"]) == list(expected["source" if "source" in expected
                                                                                  else "image"])


@pytest.mark.parametrize("name", WRITERS)
def test_writers_refuse_a_frame_without_the_columns(tmp_path: Path, name: str) -> None:
    module, make, _ = WRITERS[name]
    frame = make().drop(columns=["label"])  # a column none of the writers sorts by
    with pytest.raises(table.TableError, match=r"out\.csv: cannot write, frame lacks column\(s\) \['label'\]"):
        module.write(tmp_path / "out.csv", frame)
    assert not (tmp_path / "out.csv").exists()


def test_table_keeps_empty_cells_and_hashes_as_text(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    frame = pd.DataFrame({"sha256": ["0" * 63 + "1", "1e5"], "reason": ["", "a, \"quoted\" reason"]})
    table.write(path, frame, ["sha256", "reason"])
    back = table.read(path, ["sha256", "reason"])
    assert back.to_dict("list") == frame.to_dict("list")  # no NaN, no float parsing of "1e5", quoting round-trips


def test_predictions_are_written_at_a_fixed_precision(tmp_path: Path) -> None:
    """Six decimals: byte-stable across runs and machines whose last float bits differ (README)."""
    predictions.write(tmp_path / "p.csv", predictions_frame())
    back = predictions.read(tmp_path / "p.csv").set_index("source")
    assert back.at["a.dcm", "prob"] == round(0.1234567890123, predictions.DECIMALS) == 0.123457
    assert back.at["a.dcm", "prob_normal"] == round(1 - 0.1234567890123, predictions.DECIMALS)
    assert back["fold"].dtype.kind == back["y_true"].dtype.kind == back["pred"].dtype.kind == "i"


# ------------------------------------------------------------------------------------------------ readers


def _write_edited(path: Path, frame: pd.DataFrame, edit) -> Path:
    edit(frame.astype(object)).to_csv(path, index=False)
    return path


def _set(column: str, value: object, row: int = 0):
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[row, column] = value
        return frame
    return edit


def _drop(*columns: str):
    return lambda frame: frame.drop(columns=list(columns))


def _duplicate_row(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([frame, frame.iloc[[0]]], ignore_index=True)


BAD_FILES = {
    # name: (module, frame factory, edit, exception, message after the file name)
    "splits_missing_column": (splits, splits_frame, _drop("roi"), table.TableError, r"missing column\(s\) \['roi'\]"),
    "splits_unknown_role": (splits, splits_frame, _set("split", "holdout"), table.TableError,
                            r"unknown split value\(s\) \['holdout'\]; expected \['train', 'val', 'test'\]"),
    "splits_fold_not_int": (splits, splits_frame, _set("fold", "1.5"), table.TableError,
                            r"row 2: column 'fold' must hold integers"),
    "splits_fold_empty": (splits, splits_frame, _set("fold", "", row=2), table.TableError,
                          r"row 4: column 'fold' must hold integers"),
    "splits_duplicate": (splits, splits_frame, _duplicate_row, table.TableError, r"a scan is listed twice in one fold"),
    "predictions_missing": (predictions, predictions_frame, _drop("fold", "prob"), table.TableError,
                            r"missing column\(s\) \['fold', 'prob'\]"),
    "predictions_prob_range": (predictions, predictions_frame, _set("prob", 1.5), table.TableError,
                               r"column 'prob' must hold probabilities in \[0, 1\]"),
    "predictions_prob_text": (predictions, predictions_frame, _set("prob", "high"), table.TableError,
                              r"column 'prob' must hold probabilities"),
    "predictions_label": (predictions, predictions_frame, _set("y_true", 2), table.TableError,
                          r"columns 'y_true' and 'pred' must hold class indices 0..1"),
    "predictions_no_class_columns": (predictions, predictions_frame, _drop("prob_normal", "prob_osteoporosis"),
                                     table.TableError, r"expected a prob_<class> column per class"),
    "predictions_rows_not_summing_to_one": (predictions, predictions_frame, _set("prob_normal", 0.5),
                                            table.TableError, r"must sum to 1"),
    "predictions_pred_text": (predictions, predictions_frame, _set("pred", "yes"), table.TableError,
                              r"row 2: column 'pred' must hold integers"),
    "predictions_duplicate": (predictions, predictions_frame, _duplicate_row, table.TableError,
                              r"a scan is listed twice"),
    "augmented_k": (augmented, augmented_frame, _set("k", "first"), table.TableError,
                    r"row 2: column 'k' must hold integers"),
    "augmented_missing": (augmented, augmented_frame, _drop("parent_sha256"), table.TableError,
                          r"missing column\(s\) \['parent_sha256'\]"),
    "manifest_missing": (manifest, manifest_frame, _drop("phash", "roi"), manifest.ManifestError,
                         r"missing column\(s\) \['roi', 'phash'\].*docs/CONTRACTS.md"),
    "manifest_no_rows": (manifest, manifest_frame, lambda f: f.iloc[0:0],
                         manifest.ManifestError, r"the manifest has no rows"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_readers_reject_bad_files_naming_them(tmp_path: Path, name: str) -> None:
    module, make, edit, error, message = BAD_FILES[name]
    path = _write_edited(tmp_path / f"{name}.csv", make(), edit)
    with pytest.raises(error, match=message) as info:
        module.read(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("module", [manifest, splits, augmented, predictions], ids=lambda m: m.__name__)
def test_readers_name_a_missing_file(tmp_path: Path, module) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv: not found"):
        module.read(tmp_path / "nowhere.csv")


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage\x00\xff", b'a,b\n"unclosed,1\n'],
                         ids=["empty", "binary", "unclosed_quote"])
def test_table_rejects_unreadable_csv(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(table.TableError, match=r"bad\.csv: not a readable CSV table"):
        table.read(path, ["a"])


def test_manifest_reader_allows_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    manifest_frame().assign(extra="x").to_csv(path, index=False)
    assert "extra" in manifest.read(path).columns


def test_split_helpers() -> None:
    frame = splits_frame()
    assert splits.folds(frame) == [0, 1]
    test0 = splits.part(frame, 0, "test")
    assert list(test0["source"]) == ["normal/s0.dcm"]
    out = splits.out_of_fold(frame)
    assert list(out["source"]) == sorted(frame["source"].unique()) and list(out["fold"]) == [0, 1]
    with pytest.raises(ValueError, match=r"unknown split role 'dev'; expected one of \['train', 'val', 'test'\]"):
        splits.part(frame, 0, "dev")
    with pytest.raises(ValueError, match=r"fold 5 is not in the split table \(folds \[0, 1\]\)"):
        splits.part(frame, 5, "train")


# ------------------------------------------------------------------------------------------------ JSON


@pytest.mark.parametrize("content, required, message", [
    ("{not json", (), r"not valid JSON \(JSONDecodeError\)"),
    (b"\xff\xfe", (), r"not valid JSON \(UnicodeDecodeError\)"),
    ("[1, 2]", (), r"expected a JSON object, got list"),
    ('{"a": 1}', ("a", "b", "c"), r"missing key\(s\) \['b', 'c'\]"),
])
def test_json_reader_rejects_bad_records_naming_the_file(tmp_path: Path, content, required, message) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(jsonfile.RecordError, match=message) as info:
        jsonfile.read(path, required)
    assert str(path) in str(info.value)


def test_json_reader_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"none\.json: not found"):
        jsonfile.read(tmp_path / "none.json")


def test_json_writer_is_byte_stable_and_refuses_nan(tmp_path: Path) -> None:
    jsonfile.write(tmp_path / "a.json", {"b": 1, "a": [0.5, None]})
    jsonfile.write(tmp_path / "b.json", {"a": [0.5, None], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert jsonfile.read(tmp_path / "a.json", ("a", "b")) == {"a": [0.5, None], "b": 1}
    with pytest.raises(ValueError):
        jsonfile.write(tmp_path / "nan.json", {"x": float("nan")})
    assert not (tmp_path / "nan.json").exists()


@pytest.mark.parametrize("value, expected", [
    (0.5, 0.5), (1, 1.0), (np.float32(0.25), 0.25), (None, None), (float("nan"), None), (math.inf, None),
    (-math.inf, None), (np.nan, None),
])
def test_finite_or_none(value, expected) -> None:
    assert jsonfile.finite_or_none(value) == expected


# ------------------------------------------------------------------------------------------------ 16-bit PNG


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (48, 24), (3, 200)])
def test_png16_round_trip_is_exact_and_16_bit(tmp_path: Path, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 65536, shape, dtype=np.uint16)
    pixels.flat[0], pixels.flat[-1] = 0, 65535
    png16.write(tmp_path / "a.png", pixels)
    with Image.open(tmp_path / "a.png") as img:
        assert img.mode == "I;16" and img.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(img), pixels)
    back = png16.read(tmp_path / "a.png")
    assert back.dtype == np.float32 and back.shape == shape
    np.testing.assert_array_equal(png16.to_uint16(back.astype(np.float64)), pixels)


def test_png16_float_input_is_rounded_to_16_bits(tmp_path: Path) -> None:
    img = np.linspace(0, 1, 12 * 9).reshape(12, 9)
    png16.write(tmp_path / "f.png", img)
    np.testing.assert_allclose(png16.read(tmp_path / "f.png"), img, atol=0.5 / 65535 + 1e-7)


def test_png16_bytes_are_deterministic_and_carry_no_metadata(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 65536, (64, 48), dtype=np.uint16)
    first, second = png16.encode(pixels), png16.encode(pixels.copy())
    assert first == second
    for chunk in (b"tIME", b"tEXt", b"iTXt", b"zTXt", b"eXIf"):
        assert chunk not in first
    png16.write(tmp_path / "a.png", pixels)
    assert (tmp_path / "a.png").read_bytes() == first
    assert png16.encode(pixels.astype(np.float64) / 65535) == first  # float input in [0, 1]: the same image


@pytest.mark.parametrize("array, expected", [
    (np.array([[0, 255], [128, 1]], dtype=np.uint8), np.array([[0, 1], [128 / 255, 1 / 255]])),  # 8-bit cohorts
    (np.array([[0, 1000]], dtype=np.uint16), np.array([[0, 1000 / 65535]])),
])
def test_png16_reads_8_and_16_bit_grayscale(tmp_path: Path, array: np.ndarray, expected: np.ndarray) -> None:
    Image.fromarray(array).save(tmp_path / "g.png")
    np.testing.assert_allclose(png16.read(tmp_path / "g.png"), expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "LA"])
def test_png16_reader_rejects_colour(tmp_path: Path, mode: str) -> None:
    Image.new(mode, (4, 4)).save(tmp_path / "c.png")
    with pytest.raises(ValueError, match=rf"c\.png: expected a grayscale image, got mode '{mode}'"):
        png16.read(tmp_path / "c.png")


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 4, 3)), r"expected a 2-D image, got shape \(4, 4, 3\)"),
    (np.zeros(5), r"expected a 2-D image"),
    (np.full((3, 3), 1.5), r"values must lie in \[0, 1\], got range \[1.5, 1.5\]"),
    (np.full((3, 3), -0.1), r"values must lie in \[0, 1\]"),
    (np.full((3, 3), np.nan), r"got NaN or infinite values"),
    (np.array([[0, 300]], dtype=np.int32), r"values must lie in \[0, 1\]"),  # not uint16: read as [0, 1] floats
])
def test_png16_writer_rejects_other_arrays_naming_the_file(tmp_path: Path, array: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        png16.write(tmp_path / "bad.png", array)
    assert "bad.png" in str(info.value)
    assert not (tmp_path / "bad.png").exists()


def test_png16_reader_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        png16.read(tmp_path / "none.png")


def test_png16_encode_is_a_valid_png() -> None:
    data = png16.encode(np.full((5, 4), 40000, dtype=np.uint16))
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and np.asarray(img).max() == 40000


def test_contract_modules_are_leaves() -> None:
    """Depending on a contract never drags torch, scikit-learn, MLflow or great-expectations into a stage."""
    import subprocess
    import sys

    code = ("import sys; import spinedxa.contracts.manifest, spinedxa.contracts.splits, spinedxa.contracts.png16, "
            "spinedxa.contracts.predictions, spinedxa.contracts.augmented, spinedxa.contracts.jsonfile; "
            "print(','.join(m for m in ('torch', 'sklearn', 'mlflow', 'great_expectations', 'cv2') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == ""
