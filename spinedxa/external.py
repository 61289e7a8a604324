"""The external cohort: a second labelled folder (another site or scanner), the lockbox no choice has seen.

``external.source`` is ingested and validated by the same rules as ``data.source`` (the same label policy, duplicate
rule, burned-in text screening, ROI and great-expectations suite), into ``data/external``. It is never used for
training, early stopping, calibration, thresholds or any recipe choice: ``evaluate`` and ``baseline`` score it with
each model's fold ensemble (the model ``spinedxa predict`` uses) and report it beside the out-of-fold results.

One more rule than ingest's: a scan of the external cohort that is also in the training cohort is not external.
Exact copies (same raw sha256 or the same decoded pixels) and confirmed near-duplicates (perceptual hash within
``validate.phash_max_distance`` and SSIM >= ``validate.near_duplicate_min_ssim``, validate's own test) of any
training-cohort scan are quarantined (``in_training_cohort``), whatever their label.

With ``external.enabled: false`` the stage writes a marker instead, and the later stages say "no external cohort".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from spinedxa.config import ConfigError, Params
from spinedxa.contracts import jsonfile, manifest as manifest_contract
from spinedxa.contracts.external import DISABLED
from spinedxa.files import atomic_dir, write_checksums
from spinedxa.ingest import run_ingest
from spinedxa.validate import image_similarity, near_duplicate_pairs, validate_manifest

log = logging.getLogger(__name__)

#: Inside data/external: the validate stage's output directory (verdict, near-duplicate pairs).
VALIDATED_DIR = "validated"
REASON = "in_training_cohort"


def training_cohort_rule(internal_manifest: Path, params: Params):
    """The ingest rule that quarantines external rows whose content is in the training cohort (module docstring)."""
    internal = manifest_contract.read(internal_manifest)
    internal_dir = internal_manifest.parent
    raw = set(internal["sha256"]) - {""}
    pixels = set(internal["pixel_sha256"]) - {""}
    kept = internal[(internal["status"] == "accepted") & (internal["phash"] != "")]
    cfg = params.validate

    def rule(rows: list[dict[str, Any]], out_dir: Path) -> None:
        candidates = [r for r in rows if r["status"] in ("accepted", "duplicate", "dropped")]
        for row in candidates:
            how = ("raw bytes" if row["sha256"] in raw else
                   "decoded pixels" if row.get("pixel_sha256") and row["pixel_sha256"] in pixels else "")
            if how:
                _quarantine(row, f"{REASON}: the same {how} as a scan of the training cohort (data.source)")
        accepted = [r for r in rows if r["status"] == "accepted" and r.get("phash")]
        if not accepted or kept.empty:
            return
        hashes = [r["phash"] for r in accepted] + kept["phash"].tolist()
        pairs = near_duplicate_pairs(hashes, cfg.phash_max_distance)
        n = len(accepted)
        cross = pairs[(pairs["i"] < n) & (pairs["j"] >= n)]
        for i, j, d in cross[["i", "j", "distance"]].itertuples(index=False):
            row = accepted[i]
            if row["status"] != "accepted":
                continue  # already quarantined by an earlier pair
            other = kept.iloc[j - n]
            ssim = (image_similarity(out_dir / row["image"], internal_dir / other["image"])
                    if cfg.near_duplicate_min_ssim > 0 else 1.0)
            if ssim >= cfg.near_duplicate_min_ssim:
                _quarantine(row, f"{REASON}: a near-duplicate of a scan of the training cohort (pHash distance {d}, "
                                 f"SSIM {ssim:.3f})")

    return rule


def _quarantine(row: dict[str, Any], reason: str) -> None:
    row.update(status="quarantined", reason=reason, duplicate_of="", image="", roi="")


def run_external(params: Params, source: Path, internal_manifest: Path, out_dir: Path, summary_path: Path,
                 validation_path: Path, docs_dir: Path) -> dict[str, Any]:
    """Ingest and validate the external cohort into ``out_dir`` (or write the disabled marker).

    Returns:
        ``{"enabled": bool, "ingest": <ingest summary>, "validation": <validation summary>}``.

    Raises:
        spinedxa.ingest.IngestError, spinedxa.validate.ValidationFailed: as for the training cohort (summaries are
            written first).
    """
    if not params.external.enabled:
        with atomic_dir(out_dir) as tmp:
            jsonfile.write(tmp / DISABLED, {"enabled": False, "why": "external.enabled is false in params.yaml"})
        for path in (summary_path, validation_path):
            jsonfile.write(path, {"enabled": False})
        with atomic_dir(docs_dir) as tmp:
            (tmp / "index.html").write_text("<p>No external cohort (external.enabled: false).</p>\n", encoding="utf-8")
        write_checksums(out_dir)  # last: the docs may lie inside out_dir (data/external/docs)
        return {"enabled": False}
    if Path(source).resolve() == Path(params.data.source).resolve():
        raise ConfigError(f"external.source: {source} is data.source; an external cohort must be another folder "
                          "(or set external.enabled: false)")
    ingest = run_ingest(source, out_dir, summary_path, task=params.data.task, settings=params.ingest,
                        workers=params.runtime.workers, progress=False,
                        extra_rule=training_cohort_rule(internal_manifest, params))
    manifest = out_dir / manifest_contract.FILE_NAME
    validation = validate_manifest(manifest, params, docs_dir, validation_path, out_dir / VALIDATED_DIR)
    n_in = int((manifest_contract.read(manifest)["reason"].str.startswith(REASON)).sum())
    if n_in:
        log.warning("external cohort: %d file(s) are copies or near-duplicates of training scans: quarantined %s",
                    n_in, REASON)
    write_checksums(out_dir)  # last: validation added validated/ (and the docs, when docs_dir is inside out_dir)
    return {"enabled": True, "ingest": ingest, "validation": validation}
