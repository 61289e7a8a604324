"""Tests for spinedxa.synthesize and stages/synthesize.py: the synthetic DXA cohort.

Cohorts are tiny (a few dozen 64x48 scans at 4 mm pixels, the same 256 x 192 mm field of view as the default), so the
whole module runs in well under a minute on two cores.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from conftest import REPO, run
from spinedxa.config import SynthesizeConfig, apply_profile, load_params
from spinedxa.synthesize import (
    BANNER_SUFFIX,
    TRUTH_COLUMNS,
    AuditError,
    draw_level_labels,
    plan_cohort,
    render_banner_copy,
    render_scan,
    shortcut_audit,
    simulate_scan,
    synthesize_cohort,
    t_to_bmd,
    to_stored,
    who_class,
)

CLASSES = ("normal", "osteoporosis")
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber", "ReferringPhysicianName",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
)


def make_cfg(**overrides: object) -> SynthesizeConfig:
    """A small cohort: 40 scans (26 osteoporosis) of 64 x 48 pixels at 4 mm, confounders frequent; 4 scans with a
    burned-in banner copy, 8 with level labels."""
    base = dict(
        seed=7, n_scans=40, n_osteoporosis=26, followup_fraction=0.15, height=64, width=48, pixel_spacing_mm=4.0,
        monochrome1_fraction=0.3, osteophyte_rate=0.2, fracture_rate=0.2, scoliosis_rate=0.2,
        burned_in_fraction=0.1, level_label_fraction=0.2,
    )
    return SynthesizeConfig(**{**base, **overrides})


def modality_image(ds: pydicom.Dataset) -> np.ndarray:
    """The MONOCHROME2-oriented modality values of a written scan (what render_scan returned)."""
    modality = apply_modality_lut(ds.pixel_array, ds).astype(np.int64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        modality = (2**ds.BitsStored - 1) + int(ds.RescaleIntercept) - modality
    return modality


def read_all(out_dir: Path) -> dict[str, pydicom.Dataset]:
    return {p.relative_to(out_dir).as_posix(): pydicom.dcmread(p) for p in sorted(out_dir.rglob("*.dcm"))}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthesizeConfig, Path, Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("cohort")
    cfg = make_cfg()
    truth = synthesize_cohort(cfg, root / "raw", root / "truth.csv")
    return cfg, root / "raw", root / "truth.csv", truth


# --------------------------------------------------------------------------------------------------- the cohort plan

@pytest.mark.parametrize(
    ("n_scans", "n_osteo", "followup", "n_followups"),
    [
        (174, 114, 0.15, 15 + 8),  # the paper's cohort: round(0.15 * 114 / 1.15) + round(0.15 * 60 / 1.15)
        (40, 26, 0.0, 0),
        (10, 0, 0.5, 3),  # one class only
        (10, 10, 1.0, 5),  # every patient scanned twice
    ],
)
def test_plan_has_exact_class_counts_and_followups(n_scans: int, n_osteo: int, followup: float, n_followups: int):
    plans = plan_cohort(make_cfg(n_scans=n_scans, n_osteoporosis=n_osteo, followup_fraction=followup))
    assert len(plans) == n_scans
    assert sum(p.label for p in plans) == n_osteo
    assert all(p.class_name == who_class(p.t_score) and (p.class_name == "osteoporosis") == bool(p.label)
               for p in plans)
    assert sum(p.visit == 2 for p in plans) == n_followups
    assert [p.index for p in plans] == list(range(1, n_scans + 1))
    assert len({p.source for p in plans}) == n_scans


def test_followups_keep_patient_class_identity_and_anatomy():
    plans = plan_cohort(make_cfg(n_scans=174, n_osteoporosis=114))
    by_subject: dict[int, list] = {}
    for p in plans:
        by_subject.setdefault(p.subject, []).append(p)
    pairs = [v for v in by_subject.values() if len(v) == 2]
    assert len(pairs) == 23
    for first, second in pairs:
        assert {first.visit, second.visit} == {1, 2}
        assert first.label == second.label
        assert first.identity.patient_id == second.identity.patient_id
        assert first.identity.patient_name == second.identity.patient_name
        assert first.identity.birth_date == second.identity.birth_date
        assert first.identity.study_date != second.identity.study_date
        assert first.anatomy_seed is second.anatomy_seed  # same body, different acquisition
        assert first.seed.spawn_key != second.seed.spawn_key
        assert abs(first.t_score - second.t_score) < 0.6  # the T-score drifts only a little
    assert len({v[0].identity.patient_id for v in by_subject.values()}) == len(by_subject)  # unique per patient


def test_t_scores_follow_the_who_definition_per_class():
    plans = plan_cohort(make_cfg(n_scans=174, n_osteoporosis=114))
    t = np.array([p.t_score for p in plans])
    labels = np.array([p.label for p in plans])
    assert np.all((t <= -2.5) == (labels == 1))
    assert t.min() >= -4.5 and t.max() <= 1.5
    who = {who_class(x) for x in t[labels == 0]}
    assert who == {"normal", "osteopenia"}  # the negative class mixes normal and osteopenic BMD
    # Overlap near the threshold: both classes have scans within 0.5 T of -2.5.
    assert np.sum((t > -3.0) & (labels == 1)) >= 10 and np.sum((t < -2.0) & (labels == 0)) >= 3


@pytest.mark.parametrize(
    ("t", "expected"),
    [(-4.0, "osteoporosis"), (-2.5, "osteoporosis"), (-2.49, "osteopenia"), (-1.01, "osteopenia"),
     (-1.0, "normal"), (1.2, "normal")],
)
def test_who_class(t: float, expected: str):
    assert who_class(t) == expected


@pytest.mark.parametrize(("t", "bmd"), [(0.0, 1.07), (-2.5, 0.795), (1.0, 1.18)])
def test_t_to_bmd_uses_the_reference_scale(t: float, bmd: float):
    assert t_to_bmd(t) == pytest.approx(bmd)


@pytest.mark.parametrize(
    ("fraction", "low", "high"), [(0.0, 0, 0), (1.0, 200, 200), (0.1, 8, 35), (0.5, 70, 130)]
)
def test_monochrome1_share_follows_params(fraction: float, low: int, high: int):
    plans = plan_cohort(make_cfg(n_scans=200, n_osteoporosis=130, monochrome1_fraction=fraction))
    assert low <= sum(p.photometric == "MONOCHROME1" for p in plans) <= high


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_confounder_rates_follow_params(rate: float):
    plans = plan_cohort(make_cfg(osteophyte_rate=rate, fracture_rate=rate, scoliosis_rate=rate))
    for flags in ([p.osteophyte for p in plans], [p.fracture for p in plans], [p.scoliosis_deg > 0 for p in plans]):
        assert all(flags) if rate == 1.0 else not any(flags)


def test_scans_are_filed_in_the_folder_of_their_who_class():
    """Real cohorts come in the WHO's three folders; so does the synthetic one (the label map decides the task)."""
    plans = plan_cohort(make_cfg(n_scans=174, n_osteoporosis=114))
    for plan in plans:
        assert plan.class_name == who_class(plan.t_score) and plan.source.startswith(f"{plan.class_name}/")
        assert (plan.class_name == "osteoporosis") == bool(plan.label)  # the binary count is exact
    assert {p.class_name for p in plans} == {"normal", "osteopenia", "osteoporosis"}


def test_external_cohort_has_its_own_seed_and_scanner():
    from spinedxa.config import ExternalCohortConfig
    from spinedxa.synthesize import DEFAULT_SCANNER, external_cohort

    cfg = dataclasses.replace(make_cfg(), external=ExternalCohortConfig(
        seed=99, n_scans=20, n_osteoporosis=12, pixel_spacing_mm=0.9, monochrome1_fraction=0.5, noise_scale=2.0,
        psf_sigma_mm=1.0, display_gamma=(0.9, 2.0), display_span=(0.05, 0.4)))
    cohort, scanner = external_cohort(cfg)
    assert (cohort.seed, cohort.n_scans, cohort.n_osteoporosis, cohort.pixel_spacing_mm) == (99, 20, 12, 0.9)
    assert cohort.external is None and cohort.height == cfg.height
    assert scanner != DEFAULT_SCANNER and scanner.noise_scale == 2.0 and scanner.display_gamma == (0.9, 2.0)
    assert external_cohort(make_cfg()) is None
    # The second scanner changes the acquisition, not the body: same plan, same anatomy seed, other pixels.
    plan = plan_cohort(cohort)[0]
    one = simulate_scan(np.random.default_rng(1), plan.t_score, height=96, width=72, pixel_spacing_mm=1.0,
                        anatomy_rng=np.random.default_rng(2))
    two = simulate_scan(np.random.default_rng(1), plan.t_score, height=96, width=72, pixel_spacing_mm=1.0,
                        anatomy_rng=np.random.default_rng(2), scanner=scanner)
    assert np.array_equal(one.roi_mask, two.roi_mask) and not np.array_equal(one.image, two.image)
    assert two.noise_sd == pytest.approx(2.0 * one.noise_sd)


# --------------------------------------------------------------------------------------------------- rendering

@pytest.mark.parametrize(
    ("height", "width", "spacing", "bits"), [(64, 48, 4.0, 16), (96, 72, 2.67, 12), (32, 40, 6.0, 16)]
)
def test_render_scan_returns_uint16_monochrome2(height: int, width: int, spacing: float, bits: int):
    img = render_scan(np.random.default_rng(0), -2.0, height=height, width=width, pixel_spacing_mm=spacing,
                      bits_stored=bits, osteophyte=True, fracture=True, scoliosis_deg=20.0)
    assert img.dtype == np.uint16 and img.shape == (height, width)
    assert img.max() <= 0.95 * (2**bits - 1) and img.std() > 0
    # Bone bright (MONOCHROME2): the central column (spine) is brighter than the lateral edges on average.
    assert img[:, width // 2 - 2:width // 2 + 2].mean() > img[:, :3].mean()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(height=16, width=48, pixel_spacing_mm=4.0), "16x48"),
        (dict(height=64, width=48, pixel_spacing_mm=0.0), "pixel_spacing_mm 0.0"),
        (dict(height=64, width=48, pixel_spacing_mm=4.0, bits_stored=8), "bits_stored 8"),
    ],
)
def test_render_scan_rejects_bad_geometry(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        render_scan(np.random.default_rng(0), -1.0, **kwargs)


def test_render_scan_is_deterministic_per_generator_state():
    kw = dict(height=64, width=48, pixel_spacing_mm=4.0)
    a = render_scan(np.random.default_rng(3), -3.0, **kw)
    assert np.array_equal(a, render_scan(np.random.default_rng(3), -3.0, **kw))
    assert not np.array_equal(a, render_scan(np.random.default_rng(4), -3.0, **kw))


def test_visits_of_one_patient_share_the_anatomy():
    """Two visits of one patient have the same vertebral bodies (patient grouping matters); other patients differ."""
    kw = dict(height=128, width=96, pixel_spacing_mm=2.0)

    def roi_area(acquisition: int, patient: int, t: float = -2.8) -> int:
        scan = simulate_scan(np.random.default_rng(acquisition), t, anatomy_rng=np.random.default_rng(patient), **kw)
        return int(scan.roi_mask.sum())

    patients = range(10, 16)
    same = [abs(roi_area(1, p) - roi_area(2, p)) / roi_area(1, p) for p in patients]
    other = [abs(roi_area(1, p) - roi_area(2, p + 100)) / roi_area(1, p) for p in patients]
    assert max(same) < 0.03 < np.median(other)
    # The T-score changes density, not anatomy: same generators, different T, identical L1-L4 region.
    assert roi_area(1, 10, t=-1.0) == roi_area(1, 10, t=-3.5)


@pytest.mark.parametrize(
    ("photometric", "bits", "intercept", "stored_of_100"),
    [("MONOCHROME2", 16, 0, 100), ("MONOCHROME2", 12, -128, 228), ("MONOCHROME1", 12, 0, 3995),
     ("MONOCHROME1", 16, -2048, 65435)],
)
def test_to_stored(photometric: str, bits: int, intercept: int, stored_of_100: int):
    image = np.full((2, 2), 100, dtype=np.uint16)
    assert to_stored(image, photometric, bits, intercept)[0, 0] == stored_of_100


@pytest.mark.parametrize(
    ("photometric", "bits", "value", "message"),
    [("RGB", 16, 100, "photometric 'RGB'"), ("MONOCHROME2", 12, 5000, "BitsStored 12")],
)
def test_to_stored_rejects_bad_input(photometric: str, bits: int, value: int, message: str):
    with pytest.raises(ValueError, match=message):
        to_stored(np.full((2, 2), value, dtype=np.uint16), photometric, bits, 0)


# --------------------------------------------------------------------------------------------------- files

def test_cohort_layout_and_class_counts(cohort):
    cfg, out_dir, truth_csv, truth = cohort
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    assert files == sorted(truth["source"])
    assert all(re.fullmatch(rf"(normal|osteopenia|osteoporosis)/scan_\d{{4}}({BANNER_SUFFIX})?\.dcm", f) for f in files)
    scans = [f for f in files if not f.endswith(f"{BANNER_SUFFIX}.dcm")]
    assert len(scans) == cfg.n_scans and sum(f.startswith("osteoporosis/") for f in scans) == 26
    copies = sorted(truth.loc[truth["burned_in"], "source"])
    assert len(copies) == round(cfg.burned_in_fraction * cfg.n_scans) == 4
    assert all(c.replace(BANNER_SUFFIX, "") in scans for c in copies)
    assert not [p for p in out_dir.parent.iterdir() if p.name.endswith(".tmp")]  # atomic: no temporary leftovers
    on_disk = pd.read_csv(truth_csv)
    assert tuple(on_disk.columns) == TRUTH_COLUMNS
    assert list(on_disk["source"]) == sorted(on_disk["source"])
    assert (on_disk["label"] == on_disk["source"].str.startswith("osteoporosis/").astype(int)).all()
    assert np.allclose(on_disk["bmd_g_cm2"], t_to_bmd(on_disk["t_score"]), atol=1e-4)
    assert on_disk["burned_in"].dtype == bool and on_disk["level_labels"].dtype == bool
    assert on_disk["burned_in"].tolist() == on_disk["source"].str.endswith(f"{BANNER_SUFFIX}.dcm").tolist()
    # A banner copy has its scan's row: same label, subject, visit, T-score, level labels.
    by_source = on_disk.set_index("source")
    same = ["label", "subject", "visit", "t_score", "photometric", "level_labels"]
    for copy in by_source.index[by_source["burned_in"]]:
        assert by_source.loc[copy, same].tolist() == by_source.loc[copy.replace(BANNER_SUFFIX, ""), same].tolist()


def test_dicom_headers(cohort):
    cfg, out_dir, _, truth = cohort
    datasets = read_all(out_dir)
    photometric = dict(zip(truth["source"], truth["photometric"]))
    for source, ds in datasets.items():
        assert (out_dir / source).read_bytes()[128:132] == b"DICM"  # preamble + prefix: a proper Part 10 file
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == SecondaryCaptureImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == "BMD" and ds.Manufacturer == "SYNTHETIC" and ds.BodyPartExamined == "LSPINE"
        assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 16) and ds.HighBit == ds.BitsStored - 1
        assert ds.PixelRepresentation == 0 and ds.SamplesPerPixel == 1
        assert ds.PhotometricInterpretation == photometric[source]
        assert [float(v) for v in ds.PixelSpacing] == [cfg.pixel_spacing_mm] * 2
        assert (ds.Rows, ds.Columns) == (cfg.height, cfg.width)
        assert float(ds.RescaleSlope) == 1.0
        assert re.fullmatch(r"[A-Z ]+\^[A-Z]+", str(ds.PatientName))
        assert re.fullmatch(r"\d{8}", ds.PatientBirthDate) and ds.PatientBirthDate < ds.StudyDate
        assert ds.InstitutionName and ds.AccessionNumber and str(ds.ReferringPhysicianName)
        assert all(ds[k].value.is_valid for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    # The seed of this cohort exercises every storage variant.
    assert {ds.BitsStored for ds in datasets.values()} == {12, 16}
    assert {ds.PhotometricInterpretation for ds in datasets.values()} == {"MONOCHROME1", "MONOCHROME2"}
    assert {int(ds.RescaleIntercept) == 0 for ds in datasets.values()} == {True, False}
    assert len({ds.SOPInstanceUID for ds in datasets.values()}) == len(datasets)


def test_banner_copies_share_the_header_phi_of_their_scan(cohort):
    """A banner copy is a second series of the same study: same patient and PHI, its own series and instance UIDs,
    and no BurnedInAnnotation flag (as in the vendor files that make the pixel check necessary)."""
    _, out_dir, _, truth = cohort
    datasets = read_all(out_dir)
    copies = truth.loc[truth["burned_in"], "source"]
    assert len(copies) > 0
    for copy in copies:
        sc, original = datasets[copy], datasets[copy.replace(BANNER_SUFFIX, "")]
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "StudyInstanceUID",
                        "AccessionNumber", "PhotometricInterpretation", "BitsStored"):
            assert sc[keyword].value == original[keyword].value, keyword
        assert sc.SeriesInstanceUID != original.SeriesInstanceUID and sc.SOPInstanceUID != original.SOPInstanceUID
        assert "BurnedInAnnotation" not in sc


def test_follow_ups_share_patient_id_in_headers(cohort):
    _, out_dir, _, truth = cohort
    datasets = read_all(out_dir)
    groups = truth[~truth["burned_in"]].groupby("subject")  # the scans, not their banner copies
    assert (groups["label"].nunique() == 1).all()
    twice = [g for _, g in groups if len(g) == 2]
    assert twice, "the cohort should contain follow-up scans"
    for g in twice:
        a, b = (datasets[s] for s in g["source"])
        assert a.PatientID == b.PatientID and a.PatientName == b.PatientName
        assert a.StudyInstanceUID != b.StudyInstanceUID
    ids = {datasets[g["source"].iloc[0]].PatientID for _, g in groups}
    assert len(ids) == truth["subject"].nunique()


def test_pixels_decode_and_match_the_renderer(cohort):
    """pydicom decodes every file; after the modality LUT (and inversion for MONOCHROME1) it equals render_scan,
    except for the drawn text: level labels (small, outside the L1-L4 bodies) and the banner copies' banner."""
    cfg, out_dir, _, _ = cohort
    plans = plan_cohort(cfg)
    assert any(p.level_labels for p in plans) and any(not p.level_labels for p in plans)
    for plan in plans:
        modality = modality_image(pydicom.dcmread(out_dir / plan.source))
        scan = simulate_scan(
            np.random.default_rng(plan.seed), plan.t_score, height=cfg.height, width=cfg.width,
            pixel_spacing_mm=cfg.pixel_spacing_mm, bits_stored=plan.bits_stored, osteophyte=plan.osteophyte,
            fracture=plan.fracture, scoliosis_deg=plan.scoliosis_deg,
            anatomy_rng=np.random.default_rng(plan.anatomy_seed),
        )
        changed = modality != scan.image
        if plan.level_labels:
            assert changed.any() and not changed[scan.roi_mask].any(), plan.source
            assert changed.mean() < 0.1, plan.source
        else:
            assert not changed.any(), plan.source
        if plan.burned_in:
            copy = modality_image(pydicom.dcmread(out_dir / plan.banner_source))
            assert np.array_equal(copy, render_banner_copy(plan, cfg))
            assert (copy != modality).any()


def test_overlays_change_no_other_draw(tmp_path: Path):
    """Banners and level labels use their own random streams: with or without them, the plans agree in every other
    field and the scans without labels have the same bytes."""
    plain, busy = make_cfg(burned_in_fraction=0.0, level_label_fraction=0.0), make_cfg(level_label_fraction=0.5,
                                                                                      burned_in_fraction=0.5)
    a, b = plan_cohort(plain), plan_cohort(busy)
    overlay = {"level_labels", "burned_in"}

    def fields(plan) -> dict:  # SeedSequences compare by identity: compare their entropy and spawn key instead
        return {k: (v.entropy, v.spawn_key) if isinstance(v, np.random.SeedSequence) else v
                for k, v in dataclasses.asdict(plan).items() if k not in overlay}

    assert [fields(p) for p in a] == [fields(p) for p in b]
    assert sum(p.level_labels for p in b) == sum(p.burned_in for p in b) == 20
    assert not any(p.level_labels or p.burned_in for p in a)
    ta = synthesize_cohort(plain, tmp_path / "a", tmp_path / "a.csv")
    tb = synthesize_cohort(busy, tmp_path / "b", tmp_path / "b.csv")
    assert len(ta) == 40 and len(tb) == 60
    for plan in b:
        same = (tmp_path / "a" / plan.source).read_bytes() == (tmp_path / "b" / plan.source).read_bytes()
        assert same != plan.level_labels, plan.source
    keep = [c for c in TRUTH_COLUMNS if not c.startswith("audit_") and c not in overlay]
    originals = tb[~tb["burned_in"]].reset_index(drop=True)
    assert originals[keep].equals(ta[keep])


@pytest.mark.parametrize("side", [-1, 1])
def test_level_labels_sit_beside_each_body(side: int):
    """L1..L4 are drawn lateral to the column (never on a body), one per body, at its height, on the given side."""
    scan = simulate_scan(np.random.default_rng(4), -2.0, height=256, width=192, pixel_spacing_mm=1.0)
    labelled = draw_level_labels(scan.image, scan.roi_mask, 1.0, side, bits_stored=16)
    changed = labelled != scan.image
    assert changed.any() and not changed[scan.roi_mask].any()
    column = np.flatnonzero(scan.roi_mask.any(axis=0))
    cols = np.flatnonzero(changed.any(axis=0))
    assert (cols.max() < column.min()) if side < 0 else (cols.min() > column.max())
    roi_rows = np.flatnonzero(scan.roi_mask.any(axis=1))
    rows = np.flatnonzero(changed.any(axis=1))
    assert roi_rows.min() - 10 <= rows.min() and rows.max() <= roi_rows.max() + 10
    # Four separate labels down the column: four runs of changed rows.
    runs = 1 + int(np.sum(np.diff(rows) > 1))
    assert runs == 4


def test_truth_csv_has_no_phi(cohort):
    _, out_dir, truth_csv, _ = cohort
    text = truth_csv.read_text(encoding="utf-8")
    cells = set(re.split(r"[,\n]", text))
    for ds in read_all(out_dir).values():
        for keyword in PHI_KEYWORDS:
            value = str(ds[keyword].value)
            assert value not in cells, keyword
            if not value.replace(".", "").isdigit():  # names, institutions: not even as a substring
                assert value not in text, keyword
        assert str(ds.PatientName).split("^")[0] not in text


def test_same_seed_same_bytes_any_worker_count(tmp_path: Path):
    cfg = make_cfg(n_scans=8, n_osteoporosis=5, followup_fraction=0.5)
    outputs = {}
    for name, c, workers in (("serial", cfg, 1), ("parallel", cfg, 2), ("other_seed", dataclasses.replace(cfg, seed=8), 1)):
        synthesize_cohort(c, tmp_path / name / "raw", tmp_path / name / "truth.csv", workers=workers)
        files = sorted((tmp_path / name / "raw").rglob("*.dcm"))
        outputs[name] = {p.relative_to(tmp_path / name).as_posix(): p.read_bytes() for p in files}
        outputs[name]["truth.csv"] = (tmp_path / name / "truth.csv").read_bytes()
    assert outputs["serial"] == outputs["parallel"]
    assert outputs["serial"]["truth.csv"] != outputs["other_seed"]["truth.csv"]
    shared = set(outputs["serial"]) & set(outputs["other_seed"]) - {"truth.csv"}
    assert all(outputs["serial"][k] != outputs["other_seed"][k] for k in shared)


def test_rerun_replaces_the_cohort_whole(tmp_path: Path):
    out = tmp_path / "raw"
    synthesize_cohort(make_cfg(n_scans=6, n_osteoporosis=3), out, tmp_path / "truth.csv")
    (out / "normal" / "stray.dcm").write_bytes(b"left over")
    truth = synthesize_cohort(make_cfg(n_scans=4, n_osteoporosis=2), out, tmp_path / "truth.csv")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.dcm")) == sorted(truth["source"])
    assert len(pd.read_csv(tmp_path / "truth.csv")) == 4


# --------------------------------------------------------------------------------------------------- shortcut audit

@pytest.fixture(scope="module")
def audit_truth(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("audit")
    cfg = make_cfg(seed=2025, n_scans=120, n_osteoporosis=80, height=128, width=96, pixel_spacing_mm=2.0)
    return synthesize_cohort(cfg, root / "raw", root / "truth.csv")


def test_no_intensity_shortcut_but_a_real_bone_signal(audit_truth: pd.DataFrame):
    """Whole-image mean/SD (raw or percentile-windowed) stay near chance; the gain-normalised L1-L4 signal does not.

    Under the null, the out-of-fold AUC of 120 scans has an SD of about 0.05, so 0.70 / 0.75 are generous for a clean
    generator while any real brightness leak (AUC > 0.9, see the control below) fails. r >= 0.9 with n = 120 cannot
    happen by chance (null SD of r ~0.09).
    """
    audit = shortcut_audit(audit_truth)
    assert audit.auc_raw_mean_std <= 0.70
    assert audit.auc_window_mean_std <= 0.75
    assert audit.r_body_signal_bmd >= 0.9
    assert audit.auc_body_signal >= 0.9


def test_shortcut_audit_detects_a_leak(audit_truth: pd.DataFrame):
    """Control: if whole-image brightness followed BMD, the same audit would flag it."""
    rng = np.random.default_rng(0)
    leaky = audit_truth.assign(audit_mean=audit_truth["bmd_g_cm2"] * 1000 + rng.normal(0, 30, len(audit_truth)))
    assert shortcut_audit(leaky).auc_raw_mean_std > 0.9


def test_shortcut_audit_needs_five_subjects_per_class(cohort):
    truth = cohort[3]
    with pytest.raises(AuditError, match="subjects per class"):
        shortcut_audit(truth[(truth["label"] == 1) | (truth["subject"].isin(truth["subject"].unique()[:2]))])


# --------------------------------------------------------------------------------------------------- the stage

def test_stage_cli_writes_cohort_truth_and_figure(tmp_path: Path):
    """The exact dvc.yaml command line on the tiny profile (40 scans at 160 x 120, two workers)."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    params = apply_profile(tmp_path / "params.yaml", REPO / "profiles" / "tiny.yaml")
    cmd = [sys.executable, str(REPO / "stages" / "synthesize.py"), "--params", "params.yaml",
           "--out", "data/raw/synthetic", "--truth", "data/truth/synthetic_truth.csv",
           "--external-out", "data/raw/external", "--external-truth", "data/truth/external_truth.csv",
           "--figure", "reports/figures/synthetic_examples.png"]
    proc = run(cmd, cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert "shortcut audit" in proc.stderr
    truth = pd.read_csv(tmp_path / "data/truth/synthetic_truth.csv")
    cfg = load_params(tmp_path / "params.yaml").synthesize
    scans = truth[~truth["burned_in"]]
    assert len(scans) == cfg.n_scans == params.synthesize.n_scans and scans["label"].sum() == cfg.n_osteoporosis
    assert truth["burned_in"].sum() == round(cfg.burned_in_fraction * cfg.n_scans) > 0
    assert scans["level_labels"].sum() == round(cfg.level_label_fraction * cfg.n_scans) > 0
    ds = pydicom.dcmread(tmp_path / "data/raw/synthetic" / truth["source"].iloc[0])
    assert (ds.Rows, ds.Columns) == (cfg.height, cfg.width)
    figure = (tmp_path / "reports/figures/synthetic_examples.png").read_bytes()
    assert figure[:8] == b"\x89PNG\r\n\x1a\n" and len(figure) > 10_000
    external = pd.read_csv(tmp_path / "data/truth/external_truth.csv")
    ext = load_params(tmp_path / "params.yaml").synthesize.external
    assert (~external["burned_in"]).sum() == ext.n_scans and external.loc[~external["burned_in"], "label"].sum() == \
        ext.n_osteoporosis
    ds = pydicom.dcmread(tmp_path / "data/raw/external" / external["source"].iloc[0])
    assert float(ds.PixelSpacing[0]) == ext.pixel_spacing_mm  # the second scanner's pixels
