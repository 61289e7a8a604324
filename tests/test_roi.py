"""spinedxa.roi: the L1-L4 region located on synthetic scans with known anatomy, no ROI on images without a spine,
the ``whole`` / ``crop`` / ``extract`` helpers, and ingest quarantining ``no_roi``.

Synthetic scans come from :func:`spinedxa.synthesize.simulate_scan`, whose ``roi_mask`` is the true L1-L4 vertebral
bodies, and reach :func:`spinedxa.roi.locate` the way ingest hands them over: decoded (a MONOCHROME1 file through the
DICOM decoder, which inverts it), then windowed by :func:`spinedxa.imaging.normalise`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spinedxa import roi
from spinedxa.contracts import manifest as manifest_contract, png16
from spinedxa.imaging import decode_file, normalise
from spinedxa.synthesize import simulate_scan, to_stored, who_class
from spinedxa.task import Task

CLASSES = ("normal", "osteoporosis")
#: Field of view of the rendered scans (mm); the default cohort's is 512 px x 0.5 mm = 256 mm.
FIELD_MM = 256.0
#: The located box must hold this share of the true L1-L4 body pixels ...
MIN_COVER = 0.95
#: ... and be at most this much taller than the bodies' own extent (the box adds a margin and the T12/L1, L4/L5
#: discs; measured 1.07-1.13 on these cases), and not shorter than it.
HEIGHT_FACTOR = (0.95, 1.5)

CASES = {  # name: keyword arguments of simulate_scan (t_score included), plus monochrome1
    "normal": {"t_score": 0.5},
    "osteoporosis": {"t_score": -3.2},
    "monochrome1": {"t_score": -2.8, "monochrome1": True},
    "scoliosis_tilt": {"t_score": -1.0, "scoliosis_deg": 15.0},
    "osteophyte": {"t_score": -2.6, "osteophyte": True},
    "fracture": {"t_score": -3.0, "fracture": True},
}


def render(case: str, size: int, seed: int, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A scan of ``size`` rows (3/4 as wide) as ingest would locate it, and its true L1-L4 mask."""
    kwargs = dict(CASES[case])
    t_score, monochrome1 = kwargs.pop("t_score"), kwargs.pop("monochrome1", False)
    scan = simulate_scan(np.random.default_rng(seed), t_score, height=size, width=size * 3 // 4,
                         pixel_spacing_mm=FIELD_MM / size, **kwargs)
    if monochrome1:
        from dicom_factory import write_dicom

        stored = to_stored(scan.image, "MONOCHROME1", 16, 0)  # bone dark in the stored values
        assert stored[scan.roi_mask].mean() < stored[~scan.roi_mask].mean()
        path = write_dicom(tmp_path / "mono1.dcm", stored, photometric="MONOCHROME1", phi={})
        pixels = decode_file(path, max_pixels=10**7, multiframe="first").pixels
    else:
        pixels = scan.image
    return normalise(pixels, max_side=size), scan.roi_mask


def box_mask(shape: tuple[int, int], box: roi.Roi) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[max(box.top, 0): max(box.top + box.height, 0), max(box.left, 0): max(box.left + box.width, 0)] = True
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("case", CASES)
def test_located_box_covers_the_true_l1_l4_bodies(tmp_path: Path, case: str, size: int, seed: int) -> None:
    image, truth = render(case, size, seed, tmp_path)
    box = roi.locate(image)
    cover = (box_mask(image.shape, box) & truth).sum() / truth.sum()
    assert cover >= MIN_COVER, f"{case} {size} px: the box holds {cover:.1%} of the L1-L4 bodies"
    rows = np.flatnonzero(truth.any(axis=1))
    factor = box.height / (rows[-1] - rows[0] + 1)
    assert HEIGHT_FACTOR[0] <= factor <= HEIGHT_FACTOR[1], f"{case} {size} px: box height x{factor:.2f}"
    assert abs(box.height - roi.ASPECT * box.width) <= roi.ASPECT  # the ROI's 2:1 shape, up to rounding
    cols = np.flatnonzero(truth.any(axis=0))
    assert box.left <= cols[0] and cols[-1] < box.left + box.width
    assert box.method in ("pelvis", "centre") and box.n_discs >= roi.MIN_DISCS and box.body_width > 0
    assert roi.locate(image) == box  # deterministic


def test_cases_cover_both_classes() -> None:
    assert {who_class(c["t_score"]) for c in CASES.values()} >= {"normal", "osteoporosis"}


def _bar(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = np.full((h, w), 0.2) + rng.normal(0, 0.01, (h, w))
    img[:, w // 3: w // 3 + w // 4] += 0.6  # a bright uniform vertical band: a column without discs
    return img


NO_SPINE = {
    "noise": (lambda rng: rng.uniform(0, 1, (256, 192)), r"no vertebral column: the brightest continuous"),
    "blank": (lambda rng: np.zeros((256, 192)), r"no vertebral column: the image is blank"),
    "constant": (lambda rng: np.full((256, 192), 0.7), r"the image is blank"),
    "gradient": (lambda rng: np.linspace(0, 1, 256)[:, None] * np.ones((1, 192)), r"no vertebral column"),
    "uniform_bar": (lambda rng: _bar(256, 192, rng), r"no lumbar column: 0 disc space\(s\) in a regular rhythm"),
    "horizontal_stripes": (lambda rng: ((np.arange(256)[:, None] % 40) < 20) * np.ones((1, 192)),
                           r"no vertebral column"),
    "too_small": (lambda rng: rng.uniform(0, 1, (40, 30)), r"too small to locate the lumbar column \(need >= 48 px\)"),
    "not_2d": (lambda rng: rng.uniform(0, 1, (64, 64, 3)), r"image of shape \(64, 64, 3\)"),
}


@pytest.mark.parametrize("name", NO_SPINE)
def test_no_spine_raises_roi_not_found_with_a_reason(name: str) -> None:
    make, message = NO_SPINE[name]
    with pytest.raises(roi.RoiNotFound, match=message):
        roi.locate(make(np.random.default_rng(0)))


def test_a_spine_cut_off_above_l4_is_not_cropped_silently(tmp_path: Path) -> None:
    """Only the lower third of a scan (sacrum, L5, part of L4): no ROI rather than a wrong one."""
    image, _ = render("normal", 256, 0, tmp_path)
    with pytest.raises(roi.RoiNotFound):
        roi.locate(image[-90:])


# ----------------------------------------------------------------------------------- whole / crop / extract


@pytest.mark.parametrize("shape, expected", [
    ((300, 100), roi.Roi(0, -25, 300, 150, "whole", float("nan"), 0)),  # narrow: padded left and right
    ((200, 100), roi.Roi(0, 0, 200, 100, "whole", float("nan"), 0)),  # already 2:1
    ((100, 300), roi.Roi(-250, 0, 600, 300, "whole", float("nan"), 0)),  # wide: padded above and below
])
def test_whole_is_the_image_padded_to_the_roi_shape(shape, expected) -> None:
    box = roi.whole(np.zeros(shape))
    assert (box.top, box.left, box.height, box.width, box.method) == (
        expected.top, expected.left, expected.height, expected.width, "whole")
    assert box.height == roi.ASPECT * box.width


@pytest.mark.parametrize("box", [
    roi.Roi(10, 5, 20, 10, "pelvis", 4.0, 5),  # inside
    roi.Roi(-5, -3, 20, 10, "pelvis", 4.0, 5),  # over the top left corner
    roi.Roi(30, 25, 20, 10, "pelvis", 4.0, 5),  # over the bottom right corner
    roi.Roi(100, 100, 8, 4, "pelvis", 4.0, 5),  # entirely outside
])
def test_crop_is_the_box_zero_padded(box: roi.Roi) -> None:
    image = np.arange(1, 40 * 30 + 1, dtype=np.uint16).reshape(40, 30)
    out = roi.crop(image, box)
    assert out.shape == (box.height, box.width) and out.dtype == image.dtype
    for y in range(box.height):
        for x in range(box.width):
            iy, ix = box.top + y, box.left + x
            inside = 0 <= iy < 40 and 0 <= ix < 30
            assert out[y, x] == (image[iy, ix] if inside else 0)


@pytest.mark.parametrize("height", [32, 224, 225])
def test_extract_resizes_the_box_to_the_roi_shape(height: int) -> None:
    image = np.full((120, 90), 30000, dtype=np.uint16)
    box = roi.Roi(10, 20, 60, 30, "pelvis", 10.0, 5)
    out = roi.extract(image, box, height)
    assert out.dtype == np.uint16 and out.shape == (height, int(round(height / roi.ASPECT)))
    assert np.abs(out.astype(int) - 30000).max() <= 1  # a flat region stays flat (no ringing, no rescaling)


def test_extract_of_a_located_box_keeps_the_bodies_brighter_than_their_surroundings(tmp_path: Path) -> None:
    image, truth = render("normal", 256, 0, tmp_path)
    box = roi.locate(image)
    out = roi.extract(image, box, 224)
    mask = roi.extract((truth * 65535).astype(np.uint16), box, 224) > 32767
    assert out.shape == (224, 112)
    assert out[mask].mean() > 1.2 * out[~mask].mean()


# ----------------------------------------------------------------------------------- ingest: no_roi


def test_ingest_quarantines_no_roi_with_a_reason_and_writes_the_roi(tmp_path: Path) -> None:
    """``ingest.roi: locate``: a synthetic spine gets its ROI image; a noise image and a blank one are quarantined
    ``no_roi`` with the step that failed; the examples figure shows the accepted scan."""
    from spinedxa.config import IngestConfig
    from spinedxa.ingest import run_ingest

    source = tmp_path / "source"
    for rel, pixels in {
        "normal/spine.png": simulate_scan(np.random.default_rng(3), 0.0, height=256, width=192,
                                          pixel_spacing_mm=1.0).image,
        "osteoporosis/noise.png": np.random.default_rng(1).integers(0, 65535, (256, 192)).astype(np.uint16),
        "osteoporosis/blank.png": np.full((256, 192), 1000, dtype=np.uint16),
    }.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(source / rel)
    out, summary_path = tmp_path / "ingested", tmp_path / "ingest.json"
    settings = IngestConfig(max_side=256, max_pixels=10**6, roi="locate", roi_height=64)
    run_ingest(source, out, summary_path, task=Task(CLASSES), settings=settings, progress=False)
    rows = manifest_contract.read(out / manifest_contract.FILE_NAME).set_index("source")

    spine = rows.loc["normal/spine.png"]
    assert spine["status"] == "accepted" and spine["roi_method"] in ("pelvis", "centre")
    assert spine["roi"] == f"roi/{spine['sha256'][:16]}.png"
    assert png16.read(out / spine["roi"]).shape == (64, 32)
    assert abs(int(spine["roi_height"]) - roi.ASPECT * int(spine["roi_width"])) <= roi.ASPECT
    for name, detail in (("noise", "no vertebral column"), ("blank", "no vertebral column: the image is blank")):
        row = rows.loc[f"osteoporosis/{name}.png"]
        assert row["status"] == "quarantined" and row["reason"].startswith(f"no_roi: {detail}"), row["reason"]
        assert row["image"] == row["roi"] == ""
        assert row["format"] == "png"  # decoded before the ROI failed: the row still says what the file was
    assert sorted(p.name for p in (out / "roi").iterdir()) == [f"{spine['sha256'][:16]}.png"]
    summary = json.loads(summary_path.read_text())
    assert summary["per_reason"] == {"no_roi": 2} and summary["n_accepted"] == 1

    figure = tmp_path / "roi_examples.png"
    roi.write_examples_figure(rows.reset_index(), out, figure, CLASSES)
    with Image.open(figure) as img:
        assert img.format == "PNG" and img.width > 200
    with pytest.raises(ValueError, match=r"no accepted scan to show"):
        roi.write_examples_figure(rows.reset_index().assign(status="quarantined"), out, figure, CLASSES)
