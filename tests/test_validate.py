"""validate: the great-expectations suite passes a good manifest and fails each bad one for the right expectation.

GE costs ~6-12 s to import and ~0.5-1 s per checkpoint run here, so the GE runs are kept to one per table row below
(13 in all) plus one subprocess run of the stage; the PHI patterns and the near-duplicate search are tested without GE.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import REPO, run, stage_main
from spinedxa.config import Params, params_from_dict
from spinedxa.files import sha256_file
from spinedxa.validate import (
    MANIFEST_COLUMNS,
    ManifestError,
    ValidationFailed,
    annotate,
    find_phi,
    near_duplicate_pairs,
    WEB_ASSETS,
    external_assets,
    read_manifest,
    stabilize_site,
    validate_manifest,
    web_asset_urls,
)

CLASSES = ("normal", "osteoporosis")
VALIDATE = {
    "min_per_class": 5,
    "max_quarantine_rate": 0.2,
    "min_side": 32,
    "max_side": 8192,
    "min_std": 1.0,
    "phash_max_distance": 4,
}


def make_manifest(n_per_class: int = 6, n_quarantined: int = 1, seed: int = 0) -> pd.DataFrame:
    """A contract-conforming manifest: ``n_per_class`` accepted scans per class, the first patient of each class
    scanned twice, plus ``n_quarantined`` quarantined files. Perceptual hashes are random 64-bit values, so any two
    differ by ~32 bits (a distance <= 4 has probability ~1e-13 per pair)."""
    rng = np.random.default_rng(seed)
    rows = []
    for cls in CLASSES:
        for k in range(n_per_class):
            patient = max(k - 1, 0)  # scans 0 and 1 belong to patient 0: a follow-up
            rows.append({"source": f"{cls}/scan_{k:04d}.dcm", "status": "accepted", "reason": "", "label": cls,
                         "patient_id": "P" + hashlib.sha256(f"{cls}{patient}".encode()).hexdigest()[:12]})
    for k in range(n_quarantined):
        rows.append({"source": f"normal/broken_{k:04d}.dcm", "status": "quarantined", "reason": "unreadable",
                     "label": "normal", "patient_id": ""})
    out = []
    for row in rows:
        sha = hashlib.sha256(row["source"].encode()).hexdigest()
        ok = row["status"] == "accepted"
        out.append({
            **row,
            "sha256": sha,
            "image": f"images/{sha[:16]}.png" if ok else "",
            "roi": f"roi/{sha[:16]}.png" if ok else "",
            "roi_top": 0 if ok else "", "roi_left": -12 if ok else "", "roi_height": 96 if ok else "",
            "roi_width": 48 if ok else "", "roi_method": "whole" if ok else "", "redacted": False if ok else "",
            "width": 72 if ok else "", "height": 96 if ok else "",
            "orig_width": 120 if ok else "", "orig_height": 160 if ok else "",
            "format": "dicom", "modality": "BMD" if ok else "", "photometric": "MONOCHROME2" if ok else "",
            "bits_stored": 16 if ok else "", "pixel_spacing_mm": 1.6 if ok else "", "frames": 1 if ok else "",
            "converted_from_color": False if ok else "",
            "mean": round(float(rng.uniform(2e4, 3e4)), 6) if ok else "",
            "std": round(float(rng.uniform(5e3, 9e3)), 6) if ok else "",
            "min": 0 if ok else "", "max": 65535 if ok else "",
            "phash": f"{int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2)):016x}" if ok else "",
            "label_found": row["label"], "patient_from": "header" if ok else "",
            "pixel_sha256": hashlib.sha256(f"pixels:{sha}".encode()).hexdigest() if ok else "",
        })
    frame = pd.DataFrame(out, columns=list(MANIFEST_COLUMNS)).astype(object)
    return frame.where(frame.notna(), "")


MISSING_IMAGE = "images/0000000000000000.png"  # write_case never writes this one: an image file ingest lost


def write_case(directory: Path, manifest: pd.DataFrame) -> Path:
    """Write ``manifest.csv`` and a distinct tiny 16-bit PNG for every image it names (as ingest lays them out)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    for rel in set(manifest["image"]) - {"", MISSING_IMAGE}:
        # Random 4x3 blocks scaled up: any two such images have SSIM near 0.
        seed = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16)
        blocks = np.random.default_rng(seed).integers(0, 65536, size=(4, 3), dtype=np.uint16)
        Image.fromarray(np.kron(blocks, np.ones((8, 8), dtype=np.uint16))).save(directory / rel)
    path = directory / "manifest.csv"
    manifest.to_csv(path, index=False)
    return path


def make_params(**validate: float) -> Params:
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw["validate"] = {**VALIDATE, **validate}
    return params_from_dict(raw)


def flip_bits(phash: str, n: int) -> str:
    """``phash`` with its ``n`` lowest bits inverted (Hamming distance ``n``)."""
    return f"{int(phash, 16) ^ ((1 << n) - 1):016x}"


Mutation = Callable[[pd.DataFrame], pd.DataFrame]


def set_cell(column: str, value: object, row: int = 0) -> Mutation:
    def mutate(m: pd.DataFrame) -> pd.DataFrame:
        m.loc[row, column] = value
        return m
    return mutate


def near_duplicate(same_patient: bool, same_image: bool = True, bits: int = 2) -> Mutation:
    """Row 2's pHash comes within ``bits`` of row 3's (scans 2 and 3 of 'normal' belong to different patients); with
    ``same_image`` both rows show one image (SSIM 1), else the images differ (a pHash false positive)."""
    def mutate(m: pd.DataFrame) -> pd.DataFrame:
        m.loc[2, "phash"] = flip_bits(m.loc[3, "phash"], bits)
        if same_image:
            m.loc[2, "image"] = m.loc[3, "image"]
        if same_patient:
            m.loc[2, "patient_id"] = m.loc[3, "patient_id"]
        return m
    return mutate


def duplicate_sha(m: pd.DataFrame) -> pd.DataFrame:
    m.loc[1, "sha256"] = m.loc[0, "sha256"]
    return m


def drop_normals(m: pd.DataFrame) -> pd.DataFrame:
    return m.drop(index=[0, 1]).reset_index(drop=True)  # 4 normal scans left, min_per_class is 5


def quarantine_many(m: pd.DataFrame) -> pd.DataFrame:
    extra = make_manifest(n_per_class=0, n_quarantined=4).assign(source=lambda d: d["source"] + ".x")
    return pd.concat([m, extra], ignore_index=True)  # 5 of 17 = 0.29 > 0.2


def phi_date_and_uid(m: pd.DataFrame) -> pd.DataFrame:
    m.loc[0, "source"] = "normal/19620314.dcm"
    m.loc[0, "modality"] = "1.2.840.113619.2.55.3"
    return m


S0, S1, S2, S3 = (f"normal/scan_{k:04d}.dcm" for k in range(4))  # rows 0-3; rows 0 and 1 are one patient
# (mutation, blocking failures, warnings, rows the failed expectation names, observed value of a table-level check)
BAD_CASES = {
    "bad_label": (set_cell("label", "osteopenia"), {"label_in_classes"}, set(), {S0}, None),
    "bad_status": (set_cell("status", "pending"), {"status_known"}, set(), {S0}, None),
    "duplicate_sha256": (duplicate_sha, {"sha256_unique"}, set(), {S0, S1}, None),
    # Grouped by the split (never straddling a fold), so a warning: the data is usable as it comes.
    "near_duplicate_across_patients": (
        near_duplicate(same_patient=False), set(), {"no_near_duplicates_across_patients"}, {S2, S3}, None),
    "near_duplicate_within_patient": (
        near_duplicate(same_patient=True), set(), {"no_near_duplicates_within_patient"}, {S2, S3}, None),
    "phash_false_positive": (near_duplicate(same_patient=False, same_image=False), set(), set(), set(), None),
    "too_small_image": (set_cell("orig_width", 20), {"width_in_range"}, set(), {S0}, None),
    "too_large_image": (set_cell("orig_height", 9000), {"height_in_range"}, set(), {S0}, None),
    "blank_image": (set_cell("std", 0.2), {"not_blank"}, set(), {S0}, None),
    "missing_image_path": (set_cell("image", ""), {"accepted_fields_well_formed"}, set(), {S0}, None),
    "missing_image_file": (set_cell("image", MISSING_IMAGE), {"accepted_fields_well_formed"}, set(), {S0}, None),
    "too_few_per_class": (drop_normals, {"min_per_class_normal"}, set(), set(), 4.0),
    "too_many_quarantined": (quarantine_many, {"quarantine_rate"}, set(), set(), 5 / 17),
    "phi_person_name": (set_cell("reason", "DOE^JANE", row=12), {"no_phi"}, set(), {"normal/broken_0000.dcm"}, None),
    "phi_date_and_uid": (phi_date_and_uid, {"no_phi"}, set(), {"manifest line 2 (source redacted)"}, None),
}


def write_params(path: Path, **validate: float) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["validate"] = {**VALIDATE, **validate}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_good_manifest_passes_and_writes_docs(tmp_path):
    manifest = write_case(tmp_path, make_manifest())
    docs, summary_path = tmp_path / "reports" / "validation", tmp_path / "reports" / "validation.json"
    assert stage_main("validate")(["--params", str(write_params(tmp_path / "params.yaml")), "--manifest",
                                   str(manifest), "--docs", str(docs), "--summary", str(summary_path),
                                   "--out", str(tmp_path / "validated")]) == 0
    summary = json.loads(summary_path.read_text())
    verdict = json.loads((tmp_path / "validated" / "verdict.json").read_text())
    assert verdict["success"] is True and verdict["manifest_sha256"] == sha256_file(manifest)
    assert "manifest_sha256" not in summary  # keyed pseudonyms make it differ between clones: not a metric
    assert summary["success"] is True
    assert summary["blocking_failures"] == [] and summary["warnings"] == []
    assert (summary["n_rows"], summary["n_accepted"], summary["n_quarantined"]) == (13, 12, 1)
    assert summary["n_accepted_per_class"] == {"normal": 6, "osteoporosis": 6}
    assert summary["n_near_duplicates_within_patient"] == 0
    names = [e["name"] for e in summary["expectations"]]
    assert len(names) == len(set(names)) == summary["n_expectations"] == 13
    assert all(e["success"] and e["severity"] in ("error", "warning") for e in summary["expectations"])
    # The Data Docs site is self-contained under --docs, at fixed paths: index, the suite, the validation result.
    pages = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.html"))
    assert pages == ["expectations/manifest.html", "index.html", "validations/manifest.html"]
    assert "sha256_unique" in (docs / "validations" / "manifest.html").read_text()
    assert_offline_site(docs)


LOCAL_REF = re.compile(r"(?:src|href)=\"([^\"#][^\"]*)\"|url\('([^']+)'\)|'_table_row_link_path': '([^']+)'")


def assert_offline_site(site: Path) -> None:
    """Every page loads nothing from another host, every local reference resolves, and no time stamp or random id
    is left (the bytes depend on the data only)."""
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        assert external_assets(html) == [], page
        for ref in filter(None, (a or b or c for a, b, c in LOCAL_REF.findall(html))):
            if not ref.startswith(("http://", "https://", "mailto:")):
                assert (page.parent / ref.split("?")[0]).is_file(), (page, ref)
        assert not re.search(r"20\d\d-?\d\d-?\d\dT\d\d", html), page
        assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", html), page


@pytest.mark.parametrize("mutate, blocking, warnings, rows, observed", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_manifest_fails_for_the_right_expectation(tmp_path, mutate, blocking, warnings, rows, observed):
    manifest = write_case(tmp_path, mutate(make_manifest()))
    summary_path = tmp_path / "validation.json"
    if blocking:
        with pytest.raises(ValidationFailed) as err:
            validate_manifest(manifest, make_params(), tmp_path / "docs", summary_path)
        assert all(name in str(err.value) for name in blocking)
        assert all(row in str(err.value) for row in rows)  # the message names the offending rows by source
    else:
        validate_manifest(manifest, make_params(), tmp_path / "docs", summary_path)
    summary = json.loads(summary_path.read_text())  # written before the failure was raised
    assert set(summary["blocking_failures"]) == blocking
    assert set(summary["warnings"]) == warnings
    assert summary["success"] is (not blocking)
    assert (tmp_path / "docs" / "index.html").is_file()
    failed = [e for e in summary["expectations"] if not e["success"]]
    assert {e["name"] for e in failed} == blocking | warnings
    for entry in failed:
        assert set(entry["offending"]) == rows
        assert entry["unexpected_count"] == (len(rows) if observed is None else None)
        if observed is not None:
            assert entry["observed_value"] == pytest.approx(observed)


def test_phi_never_reaches_the_reports(tmp_path):
    """A PHI-like value is reported by column and kind, and redacted from the summary and the Data Docs."""
    m = make_manifest()
    m.loc[0, "label"] = "DOE^JANE"
    m.loc[1, "patient_id"] = "MRN20240101"
    with pytest.raises(ValidationFailed):
        validate_manifest(write_case(tmp_path, m), make_params(), tmp_path / "docs", tmp_path / "v.json")
    summary_text = (tmp_path / "v.json").read_text()
    summary = json.loads(summary_text)
    assert set(summary["blocking_failures"]) == {"no_phi", "label_in_classes"}
    assert summary["n_phi_suspect_rows"] == 2
    (phi,) = [e for e in summary["expectations"] if e["name"] == "no_phi"]
    assert phi["offending_values"] == ["label (person_name)", "patient_id (not_pseudonymous, date, digit_run)"]
    written = summary_text + "".join(p.read_text() for p in (tmp_path / "docs").rglob("*.html"))
    for secret in ("DOE^JANE", "DOE", "MRN20240101", "20240101"):
        assert secret not in written


@pytest.mark.parametrize("column, value, kinds", [
    ("reason", "DOE^JANE", "person_name"),
    ("reason", "^JANE", "person_name"),
    ("source", "normal/19620314.dcm", "date,digit_run"),
    ("source", "normal/1962-03-14_scan.dcm", "date"),
    ("reason", "study 2021/11/30", "date"),
    ("modality", "1.2.826.0.1.3680043.8.498.1", "dicom_uid,digit_run"),
    ("source", "acc_2.25.123456.7", "dicom_uid"),
    ("reason", "MRN 12345678", "digit_run"),
    ("patient_id", "PAT-0042", "not_pseudonymous"),
    ("patient_id", "P12345678901", "not_pseudonymous,digit_run"),  # P + 11 digits: a raw ID, not P + 12 hex
    ("mean", "19620314", "date,digit_run"),  # a numeric column holding an 8-digit value
    ("reason", "unreadable: 12345678.dcm x", "digit_run"),
    ("reason", "corrupt: 1.2.840.113619.2.55.3.604688 invalid", "dicom_uid"),  # an instance UID (GE root)
    ("source", "normal/10000000 bytes.dcm", "digit_run"),  # quantities are masked in `reason` only
    ("roi", "roi/DOE^JANE.png", "person_name"),  # an ROI path not in ingest's format is scanned like free text
])
def test_find_phi_flags(column, value, kinds):
    m = make_manifest(n_per_class=1, n_quarantined=0)
    m[column] = m[column].astype(object)
    m.loc[0, column] = value
    found = find_phi(m)
    assert found.loc[0, column] == kinds
    assert (found.drop(columns=[column]) == "").all().all() and found.loc[1, column] == ""


@pytest.mark.parametrize("column, value", [
    ("source", "normal/scan_0001.dcm"),
    ("source", "osteoporosis/IMG_123456.png"),  # six digits: below the MRN-like run length
    ("sha256", "1234567890" * 6 + "abcd"),  # long digit runs inside a hash are fine
    ("image", "images/1234567890123456.png"),
    ("roi", "roi/1234567890123456.png"),  # the ROI image name: hex, like the image's
    ("roi_method", "pelvis"),
    ("roi_left", "-12"),  # a box may start left of the image
    ("patient_id", "P0123456789ab"),
    ("pixel_spacing_mm", "0.5"),
    ("mean", "31234.567891234"),  # many decimals, few integer digits
    ("reason", "duplicate of normal/scan_0001.dcm"),
    ("reason", "pixel data version 1.2.3"),
    ("photometric", "MONOCHROME1"),
    # ingest's quarantine reasons quote sizes and standard transfer-syntax UIDs (spinedxa/imaging.py)
    ("reason", "too_large: rows x columns x frames = 10000 x 10000 x 1 = 100000000 > ingest.max_pixels 50000000"),
    ("reason", "not_an_image: 12345678 bytes with no DICOM/PNG/JPEG/TIFF signature"),
    ("reason", "unsupported_transfer_syntax: 1.2.840.10008.1.2.4.100: no decoder"),
])
def test_find_phi_allows(column, value):
    m = make_manifest(n_per_class=1, n_quarantined=0)
    m[column] = m[column].astype(object)
    m.loc[0, column] = value
    assert (find_phi(m) == "").all().all()


def test_manifest_columns_match_ingest():
    from spinedxa.ingest import MANIFEST_COLUMNS as INGEST_COLUMNS

    assert MANIFEST_COLUMNS == INGEST_COLUMNS


@pytest.mark.parametrize("hashes, max_distance, expected", [
    (["0000000000000000", "0000000000000001", "ffffffffffffffff"], 4, [(0, 1, 1)]),
    (["0000000000000000", "000000000000000f", "00000000000000ff"], 4, [(0, 1, 4), (1, 2, 4)]),
    (["0000000000000000", "000000000000001f"], 4, []),  # distance 5
    (["abcdefabcdefabcd", "abcdefabcdefabcd"], 0, [(0, 1, 0)]),
    ([], 4, []),
])
def test_near_duplicate_pairs(hashes, max_distance, expected):
    pairs = near_duplicate_pairs(hashes, max_distance)
    assert [tuple(r) for r in pairs[["i", "j", "distance"]].itertuples(index=False)] == expected


def test_near_duplicate_pairs_blocking_does_not_change_the_result():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, size=8)
    hashes = [f"{int(b):016x}" for b in base] + [flip_bits(f"{int(b):016x}", 3) for b in base[:3]]
    whole = near_duplicate_pairs(hashes, 4)
    assert len(whole) == 3
    pd.testing.assert_frame_equal(near_duplicate_pairs(hashes, 4, block=2), whole)


def test_near_duplicate_pairs_rejects_bad_hash():
    with pytest.raises(ValueError, match="'xyz'"):
        near_duplicate_pairs(["0000000000000000", "xyz"], 4)


@pytest.mark.parametrize("min_ssim, within, across", [(0.9, 1, 1), (0.0, 1, 2)])
def test_near_duplicates_are_phash_candidates_confirmed_by_ssim(tmp_path, min_ssim, within, across):
    m = near_duplicate(same_patient=True)(make_manifest())  # normal rows 2, 3: one patient, one image twice
    m.loc[8, ["phash", "image"]] = [flip_bits(m.loc[9, "phash"], 2), m.loc[9, "image"]]  # two patients, one image
    m.loc[10, "phash"] = flip_bits(m.loc[11, "phash"], 1)  # close hashes of distinct images: a pHash false positive
    write_case(tmp_path, m)
    stats = annotate(m, CLASSES, make_params(near_duplicate_min_ssim=min_ssim).validate, tmp_path).stats
    assert stats["n_phash_candidate_pairs"] == 3
    assert (stats["n_near_duplicates_within_patient"], stats["n_near_duplicates_across_patients"]) == (within, across)


@pytest.mark.parametrize("frame, message", [
    (make_manifest().drop(columns=["phash", "std"]), r"missing column\(s\) \['std', 'phash'\]"),
    (make_manifest().iloc[0:0], "no rows"),
])
def test_read_manifest_rejects_broken_contract(tmp_path, frame, message):
    path = tmp_path / "manifest.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(ManifestError, match=message) as err:
        read_manifest(path)
    assert str(path) in str(err.value)


def test_stage_exits_non_zero_after_writing_the_summary(tmp_path):
    manifest = write_case(tmp_path / "data", duplicate_sha(make_manifest()))
    params = write_params(tmp_path / "params.yaml")
    proc = run([sys.executable, str(REPO / "stages" / "validate.py"), "--params", str(params), "--manifest",
                str(manifest), "--docs", "reports/validation", "--summary", "reports/validation.json",
                "--out", "data/validated"], cwd=tmp_path, env={"PYTHONHASHSEED": "1"}, check=False, timeout=300)
    assert proc.returncode == 1
    # One message naming the expectation, its rows and what to change; no traceback for a data problem.
    assert "Traceback" not in proc.stderr and "ERROR validate:" in proc.stderr and "sha256_unique" in proc.stderr
    assert "what to change: re-run ingest" in proc.stderr
    assert "normal/scan_0000.dcm" in proc.stderr and "normal/scan_0001.dcm" in proc.stderr
    assert "Calculating Metrics" not in proc.stderr and "INFO great_expectations" not in proc.stderr  # quiet GE
    summary = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert summary["success"] is False and summary["blocking_failures"] == ["sha256_unique"]
    docs = tmp_path / "reports" / "validation"
    assert_offline_site(docs)
    # The same data again, in this process (another hash seed, another time, another output path): the same bytes,
    # so a rerun leaves no diff in git.
    with pytest.raises(ValidationFailed):
        validate_manifest(manifest, make_params(), tmp_path / "again", tmp_path / "again.json")
    tree = {p.relative_to(docs): p.read_bytes() for p in docs.rglob("*") if p.is_file()}
    again = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in (tmp_path / "again").rglob("*") if p.is_file()}
    assert sorted(map(str, tree)) == sorted(map(str, again))
    assert [k for k in tree if tree[k] != again[k]] == []


GE_PAGE = """<html><head>
<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"/>
<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>
<script src="https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js" integrity="sha384-x" crossorigin="anonymous"></script>
<style>a { background: url('https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/full_logo_dark.png') }</style>
</head><body>
<img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=20261127T052353.028947Z">
<a href="../../../../index.html">home</a> <link rel="icon" href="../../../static/images/favicon.ico">
<a href="#block-8cf787be-653a-4804-ada8-5fa02a8bd1a4">x</a><div id="block-8cf787be-653a-4804-ada8-5fa02a8bd1a4"></div>
<div id="block-0340092d-8b84-4dec-93aa-38292dc919f5"></div>
<td>Run Time</td><td>2026-11-27T05:23:52Z</td> <a href="https://greatexpectations.io">GE</a>
</body></html>
"""


def test_stabilize_site_fixes_names_times_ids_and_assets(tmp_path):
    site = tmp_path / "site"
    deep = site / "validations" / "manifest" / "validate" / "20261127T052352.533419Z" / "manifest-manifest.html"
    deep.parent.mkdir(parents=True)
    deep.write_text(GE_PAGE)
    (site / "index.html").write_text(
        "{'_table_row_link_path': 'validations/manifest/validate/20261127T052352.533419Z/manifest-manifest.html', "
        "'run_time': '2026-11-27 05:23:52 UTC', '_run_time_sort': 1795757032.533419}"
    )
    moved = stabilize_site(site)
    assert moved == {deep.relative_to(site).as_posix(): "validations/manifest.html"}
    assert not (site / "validations" / "manifest").exists()  # the time-stamped folders are gone
    page = (site / "validations" / "manifest.html").read_text()
    assert '"../static/vendor/bootstrap/bootstrap.min.css"' in page
    assert '<script src="../static/vendor/popper.js/popper.min.js"></script>' in page  # no SRI/crossorigin
    assert "vega" not in page  # the page draws no Vega chart
    assert page.count("../static/images/logo-long.png") == 2 and "s3" not in page
    assert 'href="../index.html"' in page and 'href="../static/images/favicon.ico"' in page
    assert 'href="#block-id1"' in page and 'id="block-id1"' in page and 'id="block-id2"' in page
    assert "<td>Run Time</td><td>not recorded</td>" in page
    assert '<a href="https://greatexpectations.io">' in page  # plain links are not fetched: kept
    assert (site / "index.html").read_text() == (
        "{'_table_row_link_path': 'validations/manifest.html', 'run_time': 'not recorded', '_run_time_sort': 0}"
    )


def test_stabilize_site_refuses_an_asset_that_is_not_vendored(tmp_path):
    (tmp_path / "index.html").write_text('<script src="https://cdn.example.org/new-widget.js"></script>')
    with pytest.raises(RuntimeError, match=r"index\.html: loads https://cdn\.example\.org/new-widget\.js"):
        stabilize_site(tmp_path)


def test_vendored_web_assets_match_their_manifest():
    """assets.json (workflow/vendor_web_assets.py) lists each vendored file with its sha256 and package; every CDN
    URL maps to one of them, and every package's licence is shipped."""
    manifest = json.loads((WEB_ASSETS / "assets.json").read_text())
    shipped = {p.relative_to(WEB_ASSETS).as_posix() for p in WEB_ASSETS.rglob("*") if p.is_file()}
    licences = {p["licence_file"] for p in manifest["packages"]}
    assert shipped == set(manifest["files"]) | licences | {"assets.json"}
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((WEB_ASSETS / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    assert set(web_asset_urls().values()) <= set(manifest["files"])
    assert all(url.startswith("https://") for url in web_asset_urls())
    for licence in licences:
        assert "permission" in (WEB_ASSETS / licence).read_text().lower(), licence


def test_dropped_files_do_not_count_in_the_quarantine_rate_and_duplicates_are_known(tmp_path):
    """Files the label map drops are not inputs of the task; exact copies of kept scans are not quarantines."""
    m = make_manifest()  # 12 accepted, 1 quarantined
    dropped = make_manifest(n_per_class=0, n_quarantined=4).assign(
        source=lambda d: "osteopenia/" + d["source"].str.split("/").str[-1], status="dropped",
        reason="dropped: data.class_map maps the folder label 'osteopenia' to drop", label="")
    copy = m.iloc[[0]].assign(source="normal/copy_of_0.dcm", status="duplicate", image="", roi="",
                              reason="duplicate: same raw bytes as normal/scan_0000.dcm (kept)")
    manifest = write_case(tmp_path, pd.concat([m, dropped, copy], ignore_index=True))
    summary = validate_manifest(manifest, make_params(max_quarantine_rate=0.1), tmp_path / "docs",
                                tmp_path / "v.json")
    assert summary["success"] is True
    assert (summary["n_dropped"], summary["n_duplicates"], summary["n_quarantined"]) == (4, 1, 1)
    assert summary["quarantine_rate"] == round(1 / 14, 6)  # 1 of the 14 files the task wanted (fixed precision)
