"""The comparison report: every model scored out of fold, paired comparisons, the paper audit, data and lineage.

Everything in the report is computed here from the pipeline's outputs (metrics JSON, predictions, plot and curve
CSVs, manifest, splits, validation/ingest/split summaries, the replay ablation, dvc.lock) and from params.yaml; the
templates in ``spinedxa/templates/`` only lay the numbers out. One Markdown template renders twice: as
``comparison.md`` (figures replaced by a pointer) and, through markdown-it, as the body of the self-contained
``comparison.html`` (figures embedded as base64 PNG, inline CSS, no external references).

Claims follow from intervals. Every model is compared, on the same out-of-fold predictions, with the baseline and with
``cnn21`` (the paper's network):

* a paired bootstrap of the ROC-AUC difference that resamples *patients* (both models see the same resample; repeat
  scans of a patient are not independent), with a percentile-bootstrap p-value, Holm-adjusted across the
  comparisons of each family (vs baseline, vs cnn21). "A beats B" is written only where that interval excludes 0
  and the Holm-adjusted p-value is below 0.05;
* DeLong's test (fast midrank algorithm of Sun & Xu 2014) for comparability with the literature, and the exact
  McNemar test of the thresholded predictions; both treat scans as independent, which repeat scans are not (said
  beside them).
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import numpy as np
import pandas as pd
import yaml
from markdown_it import MarkdownIt
from matplotlib.figure import Figure  # the object API needs no pyplot state and no display backend
from statsmodels.stats.multitest import multipletests

from spinedxa import metrics
from spinedxa.config import MODEL_NAMES, Params
from spinedxa.contracts import jsonfile, manifest as manifest_contract, replay as replay_contract
from spinedxa.contracts import transfer as transfer_contract
from spinedxa.contracts import splits as splits_contract, table
from spinedxa.contracts.manifest import model_input_shape, roi_aspect
from spinedxa.errors import UserError
from spinedxa.files import write_text_atomic
from spinedxa.provenance import provenance
from spinedxa.task import Task

#: The paper's proposed network: every other model is also compared with it.
REFERENCE_MODEL = "cnn21"
#: Name of the non-CNN baseline's outputs (reports/metrics/baseline.json, ...).
BASELINE = "baseline"
#: Where the synthesize stage writes the embedded cohort (its --out in dvc.yaml); data.source points here by default.
SYNTHETIC_SOURCE = "data/raw/synthetic"
#: ... and the second synthetic cohort (its --external-out), external.source's default.
SYNTHETIC_EXTERNAL = "data/raw/external"
#: Search bound for the paper's test-set size (the paper has 174 images; a few augmented copies stay far below).
PAPER_MAX_TEST_SIZE = 1000
#: Share of images held out for testing in the usual 80/20 split, used to read the paper's test-set size.
COMMON_TEST_FRACTION = 0.2
#: Stages whose outputs are the data lineage (raw cohort -> ingested -> split -> augmented -> models).
LINEAGE_STAGES = ("synthesize", "ingest", "split", "augment", "train")
#: Issue #8's targets on the default cohort, pooled out of fold: each CNN's ROC-AUC at least this ...
TARGET_AUC = 0.85
#: ... above the baseline, with a 95 % interval no wider than +- this; the mean over the five at least STRETCH_AUC.
TARGET_HALF_WIDTH = 0.07
STRETCH_AUC = 0.90
def required_record_keys(classes: Sequence[str]) -> tuple[str, ...]:
    """The keys every metrics JSON must hold for the report (docs/CONTRACTS.md), for the task of ``classes``."""
    keys = metrics.metric_keys(classes)
    return (*keys, *(f"{k}_ci_{s}" for k in keys for s in ("low", "high")), "confusion", "n_test",
            "n_test_patients", "threshold", "protocol", "folds")


METRIC_LABELS = {
    "accuracy": "Accuracy",
    "precision": "Precision (PPV)",
    "recall": "Recall (sensitivity)",
    "specificity": "Specificity",
    "f1": "F1",
    "balanced_accuracy": "Balanced accuracy",
    "mcc": "MCC",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC (average precision)",
    "brier": "Brier score (lower is better)",
    "kappa_quadratic": "Quadratic-weighted kappa",
}
#: Labels of the ordinal task's metrics where they differ from the binary ones (macro averages over the classes).
ORDINAL_LABELS = {
    "f1": "F1 (macro)",
    "roc_auc": "ROC-AUC (macro, one-vs-rest)",
    "pr_auc": "PR-AUC (macro, one-vs-rest)",
    "brier": "Brier score (multi-class; lower is better)",
}


def metric_label(key: str, task: Task) -> str:
    """The report's name of a metric key of ``task`` (per-class keys: ``ROC-AUC, osteopenia vs rest``)."""
    for base in metrics.PER_CLASS_KEYS:
        for c in task.classes:
            if key == f"{base}_{c}":
                return {"roc_auc": f"ROC-AUC, {c} vs rest", "recall": f"Recall of {c}",
                        "precision": f"Precision of {c}"}[base]
    if not task.is_binary and key in ORDINAL_LABELS:
        return ORDINAL_LABELS[key]
    return METRIC_LABELS.get(key, key)
#: The four figures Naeem et al. 2025 report for their 21-layer CNN (params report.paper_*).
PAPER_KEYS = ("accuracy", "precision", "recall", "f1")


class ReportInputError(UserError, ValueError):
    """An input of the report is malformed: missing keys or columns, or predictions of different scans."""


@dataclass(frozen=True)
class ReportInputs:
    """The report stage's inputs (arguments in dvc.yaml) plus the repository root for dvc.lock and git."""

    metrics_dir: Path
    predictions_dir: Path
    plots_dir: Path
    curves_dir: Path
    manifest: Path
    splits: Path
    validation: Path
    ingest_summary: Path
    split_summary: Path
    replay_dir: Path
    truth: Path | None = None  # the synthetic cohort's ground truth (burned-in text caught / missed)
    repo: Path = Path(".")
    provenance_dir: Path | None = None  # reports/provenance/<model>.json (runs, model hashes, commits)
    external_predictions_dir: Path | None = None  # reports/predictions/external/<model>.csv
    external_reports: Path | None = None  # reports/external (ingest.json, validation.json)
    external_data: Path | None = None  # data/external (its manifest)
    transfer: Path | None = None  # reports/transfer.json (pre-trained vs scratch)
    transfer_details: Path | None = None  # reports/transfer (details.json: the words the numbers need)


# --------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ModelResult:
    """One model's out-of-fold results as evaluate@<model> (or baseline) wrote them."""

    name: str
    record: Mapping[str, Any]
    predictions: pd.DataFrame
    roc: pd.DataFrame
    pr: pd.DataFrame
    calibration: pd.DataFrame
    curves: pd.DataFrame | None  # training curves (CNNs only)
    provenance: Mapping[str, Any] = field(default_factory=dict)  # reports/provenance/<model>.json
    external: pd.DataFrame | None = None  # the fold ensemble's predictions on the external cohort


def _stage_of(name: str) -> str:
    return BASELINE if name == BASELINE else f"evaluate@{name}"


def _require_file(path: Path, name: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; the report needs the outputs of stage {_stage_of(name)!r} (dvc repro {_stage_of(name)})"
        )
    return path


def _record(path: Path, required: Sequence[str]) -> dict[str, Any]:
    try:
        return jsonfile.read(path, required)
    except jsonfile.RecordError as exc:
        raise ReportInputError(str(exc)) from None


def _table(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    try:
        return table.read(path, columns)
    except table.TableError as exc:
        raise ReportInputError(str(exc)) from None


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.apply(pd.to_numeric, errors="coerce")


def load_results(models: Sequence[str], inputs: ReportInputs, classes: Sequence[str]) -> list[ModelResult]:
    """Read metrics, provenance, predictions (out of fold and external), plot tables (and training curves) of each
    model.

    Raises:
        FileNotFoundError: a model's file is missing (the message names the file and the stage that writes it).
        ReportInputError: a file lacks required keys or columns.
    """
    results = []
    for name in models:
        record = _record(_require_file(inputs.metrics_dir / f"{name}.json", name), required_record_keys(classes))
        try:
            predictions = metrics.read_predictions(_require_file(inputs.predictions_dir / f"{name}.csv", name))
        except metrics.MetricsInputError as exc:
            raise ReportInputError(str(exc)) from None
        plots = inputs.plots_dir / name
        tables = {
            stem: _numeric(_table(_require_file(plots / f"{stem}.csv", name), columns))
            for stem, columns in (
                ("roc", ("fpr", "tpr")),
                ("pr", ("recall", "precision")),
                ("calibration", ("mean_predicted", "fraction_positive", "count")),
            )
        }
        curves_path = inputs.curves_dir / f"{name}.csv"
        curves = None
        if name != BASELINE:
            curves = _numeric(_table(_require_file(curves_path, name), ("fold", "epoch", "train_loss", "val_loss",
                                                                        "val_auc")))
        prov: dict[str, Any] = {}
        if inputs.provenance_dir is not None:
            prov = _record(_require_file(inputs.provenance_dir / f"{name}.json", name), ("model",))
        external = None
        if inputs.external_predictions_dir is not None and record.get("external_n"):
            try:
                external = metrics.read_predictions(
                    _require_file(inputs.external_predictions_dir / f"{name}.csv", name))
            except metrics.MetricsInputError as exc:
                raise ReportInputError(str(exc)) from None
        results.append(ModelResult(name, record, predictions, tables["roc"], tables["pr"], tables["calibration"],
                                   curves, prov, external))
    return results


# --------------------------------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Paired:
    """Two models' predictions of the same scans, aligned by ``source`` (``prob_*``: what the metrics take)."""

    y_true: np.ndarray
    patient_id: np.ndarray
    prob_a: np.ndarray
    prob_b: np.ndarray
    pred_a: np.ndarray
    pred_b: np.ndarray


def paired_predictions(a: pd.DataFrame, b: pd.DataFrame, where: str) -> Paired:
    """Join two predictions tables on ``source`` (in ``source`` order: key-independent bootstrap draws).

    Raises:
        ReportInputError: the two tables do not cover the same scans with the same labels.
    """
    left = a.set_index("source").sort_index()
    right = b.set_index("source")
    if set(left.index) != set(right.index) or len(left) != len(right):
        raise ReportInputError(
            f"{where}: the two predictions cover different scans ({len(left)} vs {len(right)} rows, "
            f"{len(set(left.index) ^ set(right.index))} not shared); re-run both evaluations on the same splits.csv"
        )
    right = right.loc[left.index]
    if not (left["y_true"].to_numpy() == right["y_true"].to_numpy()).all():
        raise ReportInputError(f"{where}: the two predictions disagree on y_true")
    return Paired(left["y_true"].to_numpy(), left["patient_id"].to_numpy(), metrics.task_prob(left),
                  metrics.task_prob(right), left["pred"].to_numpy(), right["pred"].to_numpy())


#: Family-wise error rate of each comparison family (vs baseline, vs cnn21), Holm-adjusted.
ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    """Paired tests of ``model`` against ``other`` on the same out-of-fold predictions (ΔAUC = model - other)."""

    model: str
    other: str
    n: int
    mcnemar: metrics.McNemarResult
    delong: metrics.DeLongResult | None
    bootstrap: metrics.PairedBootstrapResult
    bootstrap_p_holm: float | None = None
    delong_p_holm: float | None = None
    mcnemar_p_holm: float | None = None

    @property
    def verdict(self) -> str:
        """What the paired patient-bootstrap interval allows us to say, in words.

        "beats" needs the interval to exclude 0 *and* the Holm-adjusted bootstrap p-value of the family to stay
        below :data:`ALPHA`: an interval that excludes 0 on its own, among several comparisons, is reported as such
        but claims nothing.
        """
        low, high = self.bootstrap.interval.low, self.bootstrap.interval.high
        if low is None or high is None:
            return "cannot tell (the interval is undefined)"
        if not self.excludes_zero:
            return "not shown to differ (the interval includes 0)"
        if self.bootstrap_p_holm is not None and self.bootstrap_p_holm >= ALPHA:
            return (f"not shown to differ after Holm adjustment (the interval excludes 0, adjusted p "
                    f"{fmt_p(self.bootstrap_p_holm)})")
        return f"{self.model} beats {self.other}" if low > 0 else f"{self.other} beats {self.model}"

    @property
    def excludes_zero(self) -> bool:
        """The paired interval excludes 0 (unadjusted; :attr:`verdict` also asks the Holm-adjusted p-value)."""
        low, high = self.bootstrap.interval.low, self.bootstrap.interval.high
        return low is not None and high is not None and (low > 0 or high < 0)


def compare(a: ModelResult, b: ModelResult, predictions_dir: Path, *, n_resamples: int, seed: int,
            external: bool = False) -> Comparison:
    """McNemar, DeLong (binary task only: a test of two ROC-AUCs) and the paired patient bootstrap of the ROC-AUC
    (macro for the ordinal task) of ``a`` against ``b``, out of fold or on the external cohort (no multiplicity
    adjustment)."""
    frames = (a.external, b.external) if external else (a.predictions, b.predictions)
    joined = paired_predictions(*frames, f"{predictions_dir}: {a.name} and {b.name}")
    y = joined.y_true
    delong = None
    if np.asarray(joined.prob_a).ndim == 1:
        try:
            delong = metrics.delong_test(y, joined.prob_a, joined.prob_b)
        except metrics.MetricsInputError:
            delong = None  # fewer than two scans of a class: DeLong's variance is not estimable (shown as n/a)
    return Comparison(
        model=a.name,
        other=b.name,
        n=len(y),
        mcnemar=metrics.mcnemar_exact(y, joined.pred_a, joined.pred_b),
        delong=delong,
        bootstrap=metrics.paired_bootstrap_auc(y, joined.prob_a, joined.prob_b, joined.patient_id,
                                               n_resamples=n_resamples, seed=seed),
    )


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (statsmodels); undefined (None/nan) entries stay None and are not counted."""
    finite = [i for i, p in enumerate(pvalues) if p is not None and math.isfinite(p)]
    out: list[float | None] = [None] * len(pvalues)
    if finite:
        adjusted = multipletests([pvalues[i] for i in finite], method="holm")[1]
        for i, p in zip(finite, adjusted):
            out[i] = float(p)
    return out


def comparison_family(results: Sequence[ModelResult], against: str, predictions_dir: Path, *, n_resamples: int,
                      seed: int, external: bool = False) -> list[Comparison]:
    """Every other model against ``against`` (on the external cohort when ``external``), with Holm-adjusted
    bootstrap, DeLong and McNemar p-values."""
    by_name = {r.name: r for r in results}
    if against not in by_name or (external and by_name[against].external is None):
        return []
    ref = by_name[against]
    raw = [compare(r, ref, predictions_dir, n_resamples=n_resamples, seed=seed, external=external) for r in results
           if r.name != against and not (against == REFERENCE_MODEL and r.name == BASELINE)
           and (not external or r.external is not None)]
    boot = holm([c.bootstrap.p_value for c in raw])
    dl = holm([c.delong.p_value if c.delong else None for c in raw])
    mc = holm([c.mcnemar.p_value for c in raw])
    return [Comparison(c.model, c.other, c.n, c.mcnemar, c.delong, c.bootstrap, b, d, m)
            for c, b, d, m in zip(raw, boot, dl, mc)]


@dataclass(frozen=True)
class TargetCheck:
    """Issue #8's targets for one CNN on the pooled out-of-fold predictions, and what explains a shortfall."""

    model: str
    variant: str
    record: Mapping[str, Any]
    auc: float | None
    half_width: float | None
    baseline: Comparison
    auc_ok: bool
    width_ok: bool
    notes: list[str] = field(default_factory=list)

    @property
    def above_baseline(self) -> bool:
        return self.baseline.bootstrap.difference > 0

    @property
    def met(self) -> bool:
        return self.auc_ok and self.width_ok and self.above_baseline


def target_checks(results: Sequence[ModelResult], vs_baseline: Sequence[Comparison], params: Params) -> list[TargetCheck]:
    """Per CNN: ROC-AUC >= :data:`TARGET_AUC`, above the baseline, interval half-width <= :data:`TARGET_HALF_WIDTH`."""
    by_model = {c.model: c for c in vs_baseline}
    checks = []
    for r in results:
        if r.name == BASELINE or r.name not in by_model:
            continue
        auc, low, high = r.record.get("roc_auc"), r.record.get("roc_auc_ci_low"), r.record.get("roc_auc_ci_high")
        half = None if low is None or high is None else (high - low) / 2
        cfg = params.train.model(r.name)
        notes = []
        if r.record.get("gradcam_degenerate"):
            notes.append(f"{r.record['gradcam_degenerate']} of its Grad-CAM maps are degenerate (no contrast)")
        if cfg.weights == "none":
            notes.append(f"trained from scratch (`train.{r.name}.weights: none`)")
        variant = r.provenance.get("variant") or r.record.get("variant") or r.name  # the variant sits in provenance
        checks.append(TargetCheck(r.name, str(variant), r.record, auc, half,
                                  by_model[r.name],
                                  auc is not None and auc >= TARGET_AUC,
                                  half is not None and half <= TARGET_HALF_WIDTH, notes))
    return checks


# --------------------------------------------------------------------------------------------------- paper audit


def _matches(value: float, reported: float) -> bool:
    """True when ``value`` (percent) prints as ``reported`` by rounding or by truncation to two decimals."""
    return reported - 0.005 <= value < reported + 0.01


@dataclass(frozen=True)
class PaperAudit:
    """The smallest test set whose confusion matrix reproduces the paper's accuracy, precision and recall."""

    n: int
    tp: int
    fn: int
    fp: int
    tn: int
    implied: dict[str, float]  # the four metrics (percent) these counts give
    copies: int | None  # n = copies x per_copy with per_copy nearest to the usual 20 % of the paper's images
    per_copy: int | None


def reconstruct_paper_confusion(
    accuracy: float, precision: float, recall: float, n_images: int, max_n: int = PAPER_MAX_TEST_SIZE
) -> PaperAudit | None:
    """Search the confusion matrices of up to ``max_n`` test images for the smallest one that reproduces the
    reported accuracy, precision and recall (percent, two decimals, rounded or truncated); None if none does.

    F1 is not used in the search: it follows from precision and recall, so comparing it with the reported F1 checks
    the paper's internal consistency.
    """
    best: tuple[int, int, int, int] | None = None
    for tp in range(1, max_n + 1):
        # Positives P with tp/P == recall, false positives with tp/(tp+fp) == precision (a +-1 margin, checked below).
        p_lo = max(tp, math.floor(tp * 100 / (recall + 0.01)) - 1)
        p_hi = math.ceil(tp * 100 / (recall - 0.005)) + 1 if recall > 0.005 else max_n
        fp_lo = max(0, math.floor(tp * 100 / (precision + 0.01)) - tp - 1)
        fp_hi = math.ceil(tp * 100 / (precision - 0.005)) - tp + 1 if precision > 0.005 else max_n
        for positives in range(p_lo, min(p_hi, max_n) + 1):
            if not _matches(100 * tp / positives, recall):
                continue
            fn = positives - tp
            for fp in range(fp_lo, fp_hi + 1):
                if tp + fp == 0 or not _matches(100 * tp / (tp + fp), precision):
                    continue
                # Accuracy 100 (n - errors) / n grows with n: the first n that reaches the reported value is the
                # smallest candidate; if it already overshoots the two-decimal window, no n fits.
                errors = fn + fp
                n = max(positives + fp, math.floor(100 * errors / (100.0 - accuracy + 0.005)) - 1, 1)
                while n <= max_n and 100 * (n - errors) / n < accuracy - 0.005:
                    n += 1
                if n <= max_n and _matches(100 * (n - errors) / n, accuracy) and (best is None or n < best[0]):
                    best = (n, tp, fn, fp)
    if best is None:
        return None
    n, tp, fn, fp = best
    tn = n - tp - fn - fp
    p, r = tp / (tp + fp), tp / (tp + fn)
    implied = {
        "accuracy": 100 * (tp + tn) / n, "precision": 100 * p, "recall": 100 * r, "f1": 100 * 2 * p * r / (p + r),
    }
    target = n_images * COMMON_TEST_FRACTION
    splits = [(k, n // k) for k in range(2, 11) if n % k == 0]
    copies, per_copy = min(splits, key=lambda kc: abs(kc[1] - target)) if splits else (None, None)
    return PaperAudit(n, tp, fn, fp, tn, implied, copies, per_copy)


# --------------------------------------------------------------------------------------------------- the replay


@dataclass(frozen=True)
class Replay:
    """The replay ablation (stage ``replay``): the leaky run against its matched control, beside the paper.

    Attributes:
        enabled: ``replay.enabled`` when the stage ran.
        leaky: the leaky run's record (augment, then split): its metrics on its own random test set of copies, the
            paper-like figure.
        matched: the leaky run's metrics on the matched scans (the control's held-out original scans).
        control: the matched control's record (split by patient, then augment): its metrics on the same scans.
        inflation: leaky minus control on the matched scans, per metric, with the paired patient-bootstrap interval.
        verdict: what the ROC-AUC inflation's interval shows: ``"inflates"`` (above 0), ``"lowers"`` (below 0) or
            ``"not shown"`` (it includes 0, or is undefined); empty when disabled.
    """

    enabled: bool
    leaky: Mapping[str, Any]
    matched: Mapping[str, Any] = field(default_factory=dict)
    control: Mapping[str, Any] = field(default_factory=dict)
    inflation: Mapping[str, Any] = field(default_factory=dict)
    verdict: str = ""


#: Metrics the replay's records must hold, each with its interval: those of every task (metrics.metric_keys); the
#: template shows the paper's four beside them where the task has them.
REPLAY_KEYS = ("accuracy", "f1", "roc_auc")


def _replay_keys(*extra: str) -> list[str]:
    return [f"{k}{s}" for k in REPLAY_KEYS for s in ("", "_ci_low", "_ci_high")] + list(extra)


def load_replay(replay_dir: Path) -> Replay | None:
    """The replay ablation's two records, or None when the leaky one is absent (a pipeline without the replay stage).

    Raises:
        ReportInputError: a record lacks keys, or the leaky record exists without its matched control (outputs of
            an older replay stage: rerun it).
    """
    c = replay_contract
    leaky_path, control_path = replay_dir / c.LEAKY_METRICS, replay_dir / c.CONTROL_METRICS
    if not leaky_path.is_file():
        return None
    leaky = _record(leaky_path, ("enabled",))
    if not leaky["enabled"]:
        return Replay(False, leaky)
    if not control_path.is_file():
        raise ReportInputError(f"{control_path}: missing beside {leaky_path.name}; rerun the replay stage "
                               "(dvc repro replay), which writes the leaky run and its matched control together")
    leaky = _record(leaky_path, _replay_keys(c.MATCHED, "model", "n_images", "n_test_images", "n_test_scans",
                                             "n_test_patients", "test_scans_in_train_share", "epochs", "tta",
                                             "val_fraction"))
    control = _record(control_path, _replay_keys(c.INFLATION, "n_test", "n_test_patients"))
    matched, inflation = leaky[c.MATCHED], control[c.INFLATION]
    for what, record, required in ((f"{leaky_path}: {c.MATCHED}", matched, _replay_keys("scans_in_train_share")),
                                   (f"{control_path}: {c.INFLATION}", inflation, _replay_keys("n_scans", "n_patients"))):
        missing = [k for k in required if k not in record]
        if missing:
            raise ReportInputError(f"{what}: missing key(s) {missing}")
    if matched.get("n_test") != inflation["n_scans"] or control["n_test"] != inflation["n_scans"]:
        raise ReportInputError(f"{replay_dir}: the leaky run and the control were scored on different scans "
                               f"({matched.get('n_test')} and {control['n_test']}); rerun the replay stage")
    low, high = inflation["roc_auc_ci_low"], inflation["roc_auc_ci_high"]
    verdict = ("not shown" if low is None or high is None or low <= 0.0 <= high
               else "inflates" if low > 0.0 else "lowers")
    return Replay(True, leaky, matched, control, inflation, verdict)


# --------------------------------------------------------------------------------------------------- transfer


def _model_order(name: str) -> int:
    """A model's place in the registry order (unknown names last)."""
    return MODEL_NAMES.index(name) if name in MODEL_NAMES else len(MODEL_NAMES)


def transfer_verdict(delta: Mapping[str, Any] | None) -> str:
    """What a paired ΔAUC interval (source minus scratch) shows: ``helps`` (above 0), ``hurts`` (below 0), ``not
    shown to help`` (it includes 0), ``n/a`` (undefined)."""
    if not delta or delta.get("ci_low") is None or delta.get("ci_high") is None:
        return "n/a"
    if delta["ci_low"] > 0.0:
        return "helps"
    if delta["ci_high"] < 0.0:
        return "hurts"
    return "not shown to help"


@dataclass(frozen=True)
class TransferRow:
    """One network and weights source of the transfer comparison.

    Attributes:
        cells: per cohort of :data:`spinedxa.contracts.transfer.COHORTS`, the paired ΔAUC entry (None: not measured)
            with its ``verdict`` and both conditions' ROC-AUCs (``scratch_auc``, ``source_auc``).
        reason: why the source is not available here (empty when it is).
    """

    model: str
    source: str
    available: bool
    cells: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)
    reason: str = ""
    weights: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Transfer:
    """The transfer stage's results (``reports/transfer.json`` and ``reports/transfer/details.json``)."""

    enabled: bool
    record: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    rows: Sequence[TransferRow] = ()

    @property
    def pretrain_cost(self) -> list[tuple[str, Mapping[str, Any]]]:
        """``(model, cost)`` of each pretrained network, in registry order."""
        return sorted((self.record.get("pretrain") or {}).items(), key=lambda item: _model_order(item[0]))

    @property
    def pretrain_minutes(self) -> float | None:
        """Wall minutes of the pretraining, all networks together (their seconds summed: they may have run side by
        side)."""
        seconds = [v.get("wall_seconds") for v in (self.record.get("pretrain") or {}).values()]
        return sum(seconds) / 60.0 if seconds and None not in seconds else None


def load_transfer(metrics_path: Path | None, details_dir: Path | None) -> Transfer | None:
    """The transfer comparison, or None without its files (a pipeline without the transfer stage).

    Raises:
        ReportInputError: a record lacks keys, or a source's entry lacks its cohorts.
    """
    if metrics_path is None or not Path(metrics_path).is_file():
        return None
    try:
        record = transfer_contract.read(metrics_path)
        if not record["enabled"]:
            return Transfer(False, record)
        details = transfer_contract.read_details(details_dir) if details_dir is not None else {}
    except jsonfile.RecordError as exc:
        raise ReportInputError(str(exc)) from None
    rows = []
    conditions = details.get("conditions", {})
    for model, entry in sorted(record["models"].items(), key=lambda item: _model_order(item[0])):
        scratch = entry.get(transfer_contract.SCRATCH) or {}
        for source, item in entry.items():
            if source == transfer_contract.SCRATCH:
                continue
            words = conditions.get(model, {}).get(source, {})
            if not item.get("available"):
                rows.append(TransferRow(model, source, False, reason=str(words.get("reason") or "not available")))
                continue
            delta = item.get("delta") or {}
            cells = {}
            for cohort in transfer_contract.COHORTS:
                d = delta.get(cohort)
                cells[cohort] = None if d is None else {
                    **d, "verdict": transfer_verdict(d), "scratch_auc": scratch.get(f"{cohort}_roc_auc"),
                    "source_auc": item.get(f"{cohort}_roc_auc")}
            rows.append(TransferRow(model, source, True, cells, weights=words.get("weights")))
    return Transfer(True, record, details, rows)


# --------------------------------------------------------------------------------------------------- data, lineage


def data_card(manifest: pd.DataFrame, ingest: Mapping[str, Any], validation: Mapping[str, Any], task: Task,
              split_summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a cohort is, from its manifest and summaries: formats and sizes, labels found -> classes after the map,
    duplicates, near-duplicates, quarantines by reason, patients and scans per class, where patients come from.

    Nothing identifying: counts, formats and sizes only.
    """
    accepted = manifest[manifest["status"] == "accepted"]
    sizes = accepted[["orig_width", "orig_height"]].apply(pd.to_numeric, errors="coerce").dropna()
    spacing = pd.to_numeric(accepted.get("pixel_spacing_mm", pd.Series(dtype=str)), errors="coerce").dropna()
    found = ingest.get("per_label_found") or {}
    labels = []
    for label, by_status in found.items():
        outcome = task.resolve(label)
        labels.append({"label": label, "becomes": outcome.cls if outcome.outcome == "class" else
                       "dropped" if outcome.outcome == "drop" else "unknown (quarantined)",
                       "files": int(sum(by_status.values())), "accepted": int(by_status.get("accepted", 0)),
                       "duplicate": int(by_status.get("duplicate", 0)),
                       "quarantined": int(by_status.get("quarantined", 0)),
                       "dropped": int(by_status.get("dropped", 0))})
    per_class = [{"cls": c, "scans": int((accepted["label"] == c).sum()),
                  "patients": int(accepted.loc[accepted["label"] == c, "patient_id"].nunique())} for c in task.classes]
    quarantined = manifest[manifest["status"] == "quarantined"].sort_values("sha256")
    return {
        "n_files": int(ingest.get("n_files", len(manifest))),
        "n_accepted": int(len(accepted)),
        "n_patients": int(accepted["patient_id"].nunique()),
        "labelling": ingest.get("labelling", "?"),
        "formats": dict(ingest.get("per_format") or {}),
        "modalities": accepted["modality"].replace("", "none").value_counts().sort_index().to_dict()
        if "modality" in accepted else {},
        "photometric": accepted["photometric"].replace("", "n/a").value_counts().sort_index().to_dict()
        if "photometric" in accepted else {},
        "converted_from_color": int(ingest.get("n_converted_from_color", 0)),
        "size": {"width": _range(sizes["orig_width"]), "height": _range(sizes["orig_height"])} if len(sizes) else None,
        "pixel_spacing": _range(spacing) if len(spacing) else None,
        "labels": labels,
        "per_class": per_class,
        "dropped": int(ingest.get("n_dropped", 0)),
        "duplicates": int(ingest.get("n_duplicates", 0)),
        "duplicate_groups": int(ingest.get("n_duplicate_groups", 0)),
        "label_conflict_groups": int(ingest.get("n_label_conflict_groups", 0)),
        "label_conflicts": int(ingest.get("n_label_conflicts", 0)),
        "near_duplicates_across": int(validation.get("n_near_duplicates_across_patients", 0)),
        "near_duplicates_within": int(validation.get("n_near_duplicates_within_patient", 0)),
        "near_duplicate_groups": int((split_summary or {}).get("n_near_duplicate_groups", 0)),
        "quarantine_rate": float(ingest.get("quarantine_rate", 0.0)),
        "quarantine_reasons": quarantined["reason"].str.split(":").str[0].value_counts().sort_index().to_dict(),
        "quarantined": [{"file": f"{sha[:12]}", "format": fmt, "reason": reason}
                        for sha, fmt, reason in zip(quarantined["sha256"], quarantined["format"],
                                                    quarantined["reason"])],
        "patient_from": dict(ingest.get("patient_from") or {}),
        "roi_methods": accepted["roi_method"].value_counts().to_dict() if "roi_method" in accepted else {},
        "validation": validation,
    }


def _range(values: pd.Series) -> dict[str, float]:
    return {"min": float(values.min()), "median": float(values.median()), "max": float(values.max())}


def data_summary(inputs: ReportInputs, task: Task) -> dict[str, Any]:
    """Counts per fold and role, the training cohort's data card, burned-in text, the validation verdict, and the
    external cohort's data card when there is one.

    Quarantined files are shown by content hash, never by name (names of real cohorts can carry identifiers).
    """
    classes = task.classes
    ingest = _record(inputs.ingest_summary, ("n_files", "n_accepted", "n_quarantined", "quarantine_rate"))
    validation = _record(inputs.validation, ("success", "blocking_failures", "warnings"))
    split_summary = _record(inputs.split_summary, ("protocol", "n_images", "n_patients", "folds"))
    manifest = manifest_contract.read(inputs.manifest, ("sha256", "status", "reason", "format", "source"))
    splits = splits_contract.read(inputs.splits)
    leaks = int((splits.groupby(["fold", "patient_id"])["split"].nunique() > 1).sum())
    out = {
        "ingest": ingest,
        "validation": validation,
        "split_summary": split_summary,
        "fold_rows": [
            {"fold": fold, "role": role, **{c: entry[role][c] for c in classes}, "total": entry[role]["total"],
             "patients": entry[role]["patients"]}
            for fold, entry in sorted(split_summary["folds"].items(), key=lambda kv: int(kv[0]))
            for role in splits_contract.ROLES
        ],
        "patients_in_two_roles": leaks,
        "card": data_card(manifest, ingest, validation, task, split_summary),
        "burned_in": burned_in_summary(manifest, inputs.truth),
        "external": None,
    }
    if inputs.external_reports is not None and inputs.external_data is not None:
        ext_ingest = _record(inputs.external_reports / "ingest.json", ())
        if ext_ingest.get("enabled", True) is not False:
            ext_validation = _record(inputs.external_reports / "validation.json", ())
            ext_manifest = manifest_contract.read(inputs.external_data / manifest_contract.FILE_NAME,
                                                  ("sha256", "status", "reason", "format", "source"))
            out["external"] = data_card(ext_manifest, ext_ingest, ext_validation, task)
            out["external"]["in_training_cohort"] = int(ext_manifest["reason"].str.startswith(
                "in_training_cohort").sum())
    return out


def burned_in_summary(manifest: pd.DataFrame, truth_path: Path | None) -> dict[str, Any]:
    """Burned-in text caught / missed / false alarms against the synthetic ground truth (``burned_in`` column).

    Caught: a banner file quarantined ``burned_in_text`` or accepted redacted. Missed: a banner file accepted
    unredacted. False alarm: a clean file (no banner; level labels are not PHI) quarantined or redacted for text.
    Without a truth file only the counts ingest knows are given.
    """
    flagged = manifest["reason"].str.startswith("burned_in_text") | (manifest.get("redacted", "") == "True")
    out: dict[str, Any] = {"flagged": int(flagged.sum()), "redacted": int((manifest.get("redacted", "") == "True").sum()),
                           "truth": False}
    if truth_path is None or not Path(truth_path).is_file():
        return out
    truth = _table(Path(truth_path), ("source", "burned_in"))
    merged = manifest.assign(flagged=flagged).merge(truth[["source", "burned_in", *(["level_labels"] if
                                                    "level_labels" in truth else [])]], on="source", how="left")
    banner = merged["burned_in"] == "True"
    clean = merged["burned_in"] == "False"
    out.update(truth=True, banner_files=int(banner.sum()), caught=int((banner & merged["flagged"]).sum()),
               missed=int((banner & ~merged["flagged"]).sum()), clean_files=int(clean.sum()),
               false_alarms=int((clean & merged["flagged"]).sum()))
    if "level_labels" in merged:
        labelled = clean & (merged["level_labels"] == "True")
        out.update(level_label_files=int(labelled.sum()),
                   level_label_false_alarms=int((labelled & merged["flagged"]).sum()))
    return out


def lock_digests(lock_path: Path) -> list[dict[str, str]]:
    """The data and model digests that ``dvc.lock`` records for the lineage stages ([] when there is no lock yet)."""
    if not lock_path.is_file():
        return []
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    out = []
    for stage, entry in (lock.get("stages") or {}).items():
        if stage.split("@", 1)[0] not in LINEAGE_STAGES:
            continue
        for o in entry.get("outs") or []:
            if o.get("md5"):
                out.append({"stage": stage, "path": str(o["path"]), "md5": str(o["md5"])})
    return out


# --------------------------------------------------------------------------------------------------- figures


def _png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _label(r: ModelResult, key: str) -> str:
    value = r.record.get(key)
    return f"{r.name} ({'n/a' if value is None else f'{value:.3f}'})"


def figures(results: Sequence[ModelResult], classes: Sequence[str]) -> dict[str, str]:
    """ROC, precision-recall, calibration, confusion-matrix and training-curve figures as base64 PNG, by name."""
    out = {}
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    for r in results:
        ax.plot(r.roc["fpr"], r.roc["tpr"], label=_label(r, "roc_auc"))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    vs = "" if len(classes) == 2 else f" ({classes[-1]} vs rest; legend: macro ROC-AUC)"
    ax.set(xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)",
           title=f"ROC curves, pooled out of fold{vs or ' (legend: ROC-AUC)'}", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower right")
    out["roc"] = _png_base64(fig)

    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    for r in results:
        ax.plot(r.pr["recall"], r.pr["precision"], drawstyle="steps-post", label=_label(r, "pr_auc"))
    ax.set(xlabel="Recall (sensitivity)", ylabel="Precision (PPV)", xlim=(0, 1), ylim=(0, 1.02),
           title="Precision-recall curves (legend: average precision)")
    ax.legend(fontsize=8, loc="lower left")
    out["pr"] = _png_base64(fig)

    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    for r in results:
        ax.plot(r.calibration["mean_predicted"], r.calibration["fraction_positive"], marker="o", markersize=3,
                label=_label(r, "brier"))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel=f"Mean predicted P({classes[-1]})", ylabel=f"Observed fraction {classes[-1]}", xlim=(0, 1),
           ylim=(0, 1), title=f"Calibration of P({classes[-1]}) ({metrics.CALIBRATION_BINS} bins; legend: Brier "
                             "score)")
    ax.legend(fontsize=8, loc="upper left")
    out["calibration"] = _png_base64(fig)

    cols = min(3, len(results))
    rows = math.ceil(len(results) / cols)
    fig = Figure(figsize=(3.2 * cols * max(1.0, len(classes) / 2.5), 3.0 * rows * max(1.0, len(classes) / 2.5)))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    ticks = list(range(len(classes)))
    for ax, r in zip(axes.flat, results):
        cm = confusion_array(r.record, classes)
        top = max(int(cm.max()), 1)
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=top)  # a fixed 0 floor keeps light cells light in every panel
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
        ax.set_xticks(ticks, labels=list(classes), fontsize=7)
        ax.set_yticks(ticks, labels=list(classes), fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("actual", fontsize=8)
        ax.set_title(r.name, fontsize=9)
    fig.tight_layout()
    out["confusion"] = _png_base64(fig)

    cnns = [r for r in results if r.curves is not None]
    if cnns:
        fig = Figure(figsize=(3.3 * len(cnns), 5.6))
        axes = fig.subplots(2, len(cnns), squeeze=False)
        for j, r in enumerate(cnns):
            for fold, g in r.curves.groupby("fold"):
                axes[0, j].plot(g["epoch"], g["train_loss"], linestyle="--", linewidth=1, label=f"fold {fold:g} train")
                axes[0, j].plot(g["epoch"], g["val_loss"], linewidth=1, label=f"fold {fold:g} val")
                axes[1, j].plot(g["epoch"], g["val_auc"], linewidth=1, label=f"fold {fold:g}")
            axes[0, j].set_title(f"{r.name}: loss", fontsize=9)
            axes[0, j].set_ylim(0, min(3.0, float(np.nanmax(r.curves[["train_loss", "val_loss"]].to_numpy())) + 0.1))
            axes[1, j].set_title(f"{r.name}: validation ROC-AUC", fontsize=9)
            axes[1, j].set_ylim(0, 1.02)
            axes[1, j].set_xlabel("epoch", fontsize=8)
            for ax in axes[:, j]:
                ax.tick_params(labelsize=7)
                ax.legend(fontsize=6)
        fig.tight_layout()
        out["curves"] = _png_base64(fig)
    return out


def confusion_array(record: Mapping[str, Any], classes: Sequence[str]) -> np.ndarray:
    """The record's confusion matrix as an array (rows actual, columns predicted, in class order)."""
    cm = record["confusion"]
    return np.array([[int(cm[a][b]) for b in classes] for a in classes])


# --------------------------------------------------------------------------------------------------- rendering


def fmt_num(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals, or ``n/a`` when undefined."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_ci(record: Mapping[str, Any], key: str) -> str:
    """``point [low, high]`` with three decimals; a degenerate or undefined interval prints as ``n/a``."""
    point, low, high = record.get(key), record.get(f"{key}_ci_low"), record.get(f"{key}_ci_high")
    interval = "[n/a]" if low is None or high is None else f"[{low:.3f}, {high:.3f}]"
    return f"{fmt_num(point)} {interval}"


def fmt_p(p: float | None) -> str:
    """A p-value: ``<0.001`` below that, else three decimals; ``n/a`` when undefined."""
    if p is None or not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def md_cell(text: Any) -> str:
    """Text safe inside a Markdown table cell that is also rendered to HTML (pipes and angle brackets escaped)."""
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("spinedxa", "templates"),
        undefined=jinja2.StrictUndefined,  # a misspelt name in a template fails instead of printing nothing
        autoescape=False,  # Markdown, not HTML; table cells go through md_cell
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=fmt_num, p=fmt_p, cell=md_cell)
    env.globals.update(ci=fmt_ci)
    return env


def cohort_words(params: Params) -> dict[str, str]:
    """The words the report uses for the cohort and the task, from params (never a literal true of one cohort only).

    ``title``: e.g. "Osteoporosis vs normal in the synthetic AP lumbar spine DXA cohort"; ``what``: the cohort as a
    noun phrase; ``images``: what one image is ("lumbar spine DXA image", "knee radiograph image", or "image").
    """
    data, task = params.data, params.data.task
    kind = " vs ".join(reversed(task.classes)) if task.is_binary else " < ".join(task.classes)
    what = data.name or f"the cohort in {data.source}"
    image = " ".join(w for w in (data.anatomy, data.modality) if w).strip()
    images = f"{image} image" if image else "image"
    return {"title": f"{kind[0].upper()}{kind[1:]} in the {what}" if data.name else f"{kind[0].upper()}{kind[1:]} "
                                                                                     f"in {what}",
            "what": what, "images": images,
            "task": task.describe(), "anatomy": data.anatomy or "not stated (data.anatomy)",
            "modality": data.modality or "not stated (data.modality)"}


def build_context(params: Params, inputs: ReportInputs) -> dict[str, Any]:
    """Everything the templates show, computed from the inputs.

    Raises:
        FileNotFoundError: a model's metrics, predictions or plot file is missing (named in the message).
        ReportInputError: an input lacks keys/columns or two models were scored on different scans.
    """
    models = [*params.train.models, BASELINE]
    classes, cfg = params.data.classes, params.evaluate
    task = params.data.task
    results = load_results(models, inputs, classes)
    by_name = {r.name: r for r in results}
    rep = params.report
    reported = {"accuracy": rep.paper_accuracy, "precision": rep.paper_precision, "recall": rep.paper_recall,
                "f1": rep.paper_f1}
    # The paper's figures are a reference for the paper's task only: binary, osteoporosis the positive class.
    paper_task = task.is_binary and task.positive == "osteoporosis"
    # F1 is the harmonic mean of precision and recall: recomputing it checks the paper's internal consistency.
    paper_f1_from_pr = 2 * rep.paper_precision * rep.paper_recall / (rep.paper_precision + rep.paper_recall)
    scored = results[0].predictions
    cnn_results = [r for r in results if r.name != BASELINE]
    best = max((r for r in cnn_results if r.record["roc_auc"] is not None), key=lambda r: r.record["roc_auc"],
               default=None)
    keys = metrics.metric_keys(classes)
    skipped = {
        r.name: [f"{k} {r.record[f'{k}_ci_skipped']}" for k in keys if r.record.get(f"{k}_ci_skipped")]
        for r in results
    }
    family = {"n_resamples": cfg.bootstrap, "seed": cfg.seed}
    vs_baseline = comparison_family(results, BASELINE, inputs.predictions_dir, **family)
    vs_reference = comparison_family(results, REFERENCE_MODEL, inputs.predictions_dir, **family)
    external_vs_baseline = comparison_family(results, BASELINE, inputs.predictions_dir, external=True, **family)
    checks = target_checks(results, vs_baseline, params)
    aucs = [c.auc for c in checks if c.auc is not None]
    prov = provenance(inputs.repo)
    trained = {(r.provenance.get("train_git_commit"), r.provenance.get("train_git_dirty")) for r in cnn_results}
    runtime = sorted({(str(r.provenance.get("fast_path")), str(r.provenance.get("threads"))) for r in cnn_results})
    counts = scored["y_true"].value_counts()
    patient_keys = (["roc_auc", "accuracy", "recall", "specificity", "f1"] if task.is_binary
                    else ["roc_auc", "accuracy", "balanced_accuracy", "kappa_quadratic", "f1"])
    headline = (["accuracy", "precision", "recall", "f1", "roc_auc"] if task.is_binary
                else ["accuracy", "balanced_accuracy", "kappa_quadratic", "f1", "roc_auc"])
    return {
        "params": params,
        "task": task,
        "words": cohort_words(params),
        "classes": classes,
        "models": models,
        "results": results,
        "cnn_results": cnn_results,
        "baseline": by_name[BASELINE],
        "metric_keys": keys,
        "metric_labels": {**METRIC_LABELS, **{k: metric_label(k, task) for k in (*keys, *patient_keys)}},
        "patient_keys": patient_keys,
        "headline_keys": headline,
        "paper_keys": PAPER_KEYS,
        "paper_task": paper_task,
        "reported": reported,
        "audit": reconstruct_paper_confusion(rep.paper_accuracy, rep.paper_precision, rep.paper_recall,
                                             rep.paper_n_images),
        "paper_n_images": rep.paper_n_images,
        "paper_max_n": PAPER_MAX_TEST_SIZE,
        "paper_f1_from_pr": paper_f1_from_pr,
        "paper_f1_consistent": _matches(paper_f1_from_pr, rep.paper_f1),
        "scored": {
            "n": len(scored),
            "patients": int(scored["patient_id"].nunique()),
            "per_class": {c: int(counts.get(k, 0)) for k, c in enumerate(classes)},
            "folds": int(results[0].record["folds"]),
            "protocol": str(results[0].record["protocol"]),
        },
        "best": best,
        "skipped": {name: items for name, items in skipped.items() if items},
        "vs_baseline": vs_baseline,
        "vs_reference": vs_reference,
        "external_vs_baseline": external_vs_baseline,
        "external_results": [r for r in results if r.external is not None],
        "reference": REFERENCE_MODEL,
        "reference_record": by_name[REFERENCE_MODEL].record if REFERENCE_MODEL in by_name else None,
        "checks": checks,
        "targets": {"auc": TARGET_AUC, "half_width": TARGET_HALF_WIDTH, "stretch": STRETCH_AUC,
                    "mean_auc": float(np.mean(aucs)) if aucs else None, "all_met": all(c.met for c in checks)},
        "replay": load_replay(inputs.replay_dir),
        "transfer": load_transfer(inputs.transfer, inputs.transfer_details),
        "data": data_summary(inputs, task),
        "synthetic": Path(params.data.source).as_posix().rstrip("/") == SYNTHETIC_SOURCE,
        "synthetic_external": Path(params.external.source).as_posix().rstrip("/") == SYNTHETIC_EXTERNAL,
        "provenance": prov,
        "trained_provenance": sorted(trained, key=str),
        "runtime": runtime,
        "input_shapes": {r.name: model_input_shape(params.train.model(r.name).image_size, params.ingest.roi)
                         for r in cnn_results},
        "roi_aspect": roi_aspect(params.ingest.roi),
        "lock": lock_digests(inputs.repo / "dvc.lock"),
        "figures": figures(results, classes),
    }


#: Inline style of the HTML report (no external stylesheet: the file must stand alone).
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f2f2f2; }
code { background: #f5f5f5; padding: 0 0.2em; }
img { max-width: 100%; }
figure { display: inline-block; margin: 0.5em; }
"""


def render(context: Mapping[str, Any]) -> tuple[str, str]:
    """Render ``(markdown, html)`` from one Markdown template; the HTML embeds the figures."""
    env = _environment()
    template = env.get_template("comparison.md.j2")
    markdown = template.render(**context, html=False)
    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(template.render(**context, html=True))
    html = env.get_template("comparison.html.j2").render(body=body, css=_CSS, title=context["words"]["title"])
    return markdown, html


def write_report(params: Params, inputs: ReportInputs, out_md: str | Path, out_html: str | Path) -> dict[str, Any]:
    """Build the report and write ``comparison.md`` and ``comparison.html`` (atomically); return the context."""
    context = build_context(params, inputs)
    markdown, html = render(context)
    write_text_atomic(out_md, markdown)
    write_text_atomic(out_html, html)
    return context


def log_data_metrics(params: Params, inputs: ReportInputs) -> str:
    """Mirror the data stages' DVC metrics (reports/ingest.json, validation.json, split.json) into one MLflow run
    named ``data``, so every DVC metric is also in MLflow; returns its run id. Numbers only, flattened keys
    (``ingest.n_files``, ``split.folds.0.test.total``); nothing identifying is in these summaries."""
    from spinedxa import tracking

    numbers: dict[str, float] = {}
    sources = [("ingest", inputs.ingest_summary), ("validation", inputs.validation), ("split", inputs.split_summary)]
    if inputs.external_reports is not None:
        sources += [("external.ingest", inputs.external_reports / "ingest.json"),
                    ("external.validation", inputs.external_reports / "validation.json")]
    for prefix, path in sources:
        tracking.flatten_metrics(prefix, jsonfile.read(path), numbers)
    prov = provenance(inputs.repo)
    experiment = tracking.experiment_name(params.runtime.mlflow_experiment)
    with tracking.training_run(experiment, "data", params={"data.source": params.data.source,
                                                             "data.classes": ",".join(params.data.classes),
                                                             "external.source": params.external.source},
                               tags={"git_commit": prov.commit, "git_dirty": "unknown" if prov.dirty is None else str(prov.dirty).lower(),
                                     "dvc_stage": "ingest,validate,split"}) as run_id:
        tracking.log_epoch(numbers, 0)
    return run_id
