"""The comparison report: every model side by side, paired tests, the paper audit, data summary and lineage.

Everything in the report is computed here from the pipeline's outputs (metrics JSON, predictions and plot CSVs,
manifest, splits, validation/ingest/split summaries, dvc.lock) and from params.yaml; the templates in
``spinedxa/templates/`` only lay the numbers out. One Markdown template renders twice: as ``comparison.md`` (figures
replaced by a pointer) and, through markdown-it, as the body of the self-contained ``comparison.html`` (figures
embedded as base64 PNG, inline CSS, no external references).

Paired tests of ``cnn21`` against each other model, on the same test images:

* exact McNemar test of the thresholded predictions (statsmodels);
* DeLong's test of the ROC-AUC difference (fast midrank algorithm of Sun & Xu 2014, :mod:`spinedxa.metrics`): the
  standard, closed-form test for correlated AUCs, comparable with the literature;
* a paired bootstrap of the AUC difference that resamples *patients*: DeLong assumes independent images, but patients
  with a follow-up scan contribute two correlated images, so the bootstrap interval is the one that respects the
  design. Holm's step-down adjustment is applied across the comparisons of each test family.
"""

from __future__ import annotations

import base64
import io
import json
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
from spinedxa.config import Params
from spinedxa.files import write_text_atomic
from spinedxa.provenance import git_commit

#: The model every other one is tested against (the paper's proposed network).
REFERENCE_MODEL = "cnn21"
#: Name of the non-CNN baseline's outputs (reports/metrics/baseline.json, ...).
BASELINE = "baseline"
#: Where the synthesize stage writes the embedded cohort (its --out in dvc.yaml); data.source points here by default.
SYNTHETIC_SOURCE = "data/raw/synthetic"
#: Search bound for the paper's test-set size (the paper has 174 images; a few augmented copies stay far below).
PAPER_MAX_TEST_SIZE = 1000
#: Share of images held out for testing in the usual 80/20 split, used to read the paper's test-set size.
COMMON_TEST_FRACTION = 0.2
#: Stages whose outputs are the data lineage (raw cohort -> ingested -> split -> augmented -> models).
LINEAGE_STAGES = ("synthesize", "ingest", "split", "augment", "train")
#: The keys every metrics JSON must hold for the report (docs/CONTRACTS.md).
REQUIRED_RECORD_KEYS = (
    *metrics.METRIC_KEYS,
    *(f"{k}_ci_{s}" for k in metrics.METRIC_KEYS for s in ("low", "high")),
    "tp", "fp", "tn", "fn", "n_test", "n_test_patients", "threshold",
)
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
}
#: The four figures Naeem et al. 2025 report for their 21-layer CNN (params report.paper_*).
PAPER_KEYS = ("accuracy", "precision", "recall", "f1")


class ReportInputError(ValueError):
    """An input of the report is malformed: missing keys or columns, or predictions of different test sets."""


@dataclass(frozen=True)
class ReportInputs:
    """The report stage's inputs (arguments in dvc.yaml) plus the repository root for dvc.lock and git."""

    metrics_dir: Path
    predictions_dir: Path
    plots_dir: Path
    manifest: Path
    splits: Path
    validation: Path
    ingest_summary: Path
    split_summary: Path
    repo: Path = Path(".")


# --------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ModelResult:
    """One model's test results as evaluate@<model> (or baseline) wrote them."""

    name: str
    record: Mapping[str, Any]
    predictions: pd.DataFrame
    roc: pd.DataFrame
    pr: pd.DataFrame
    calibration: pd.DataFrame


def _stage_of(name: str) -> str:
    return BASELINE if name == BASELINE else f"evaluate@{name}"


def _require_file(path: Path, name: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; the report needs the outputs of stage {_stage_of(name)!r} (dvc repro {_stage_of(name)})"
        )
    return path


def _read_json(path: Path, required: Sequence[str]) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    data = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in required if k not in data]
    if missing:
        raise ReportInputError(f"{path}: missing key(s) {missing}")
    return data


def _read_csv(path: Path, columns: Sequence[str], *, text: bool = False) -> pd.DataFrame:
    """Read a CSV and check its columns; ``text=True`` keeps every cell a string (hashes, ids, empty reasons)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False) if text else pd.read_csv(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReportInputError(f"{path}: missing column(s) {missing}; expected {list(columns)}")
    return frame


def load_results(models: Sequence[str], inputs: ReportInputs) -> list[ModelResult]:
    """Read metrics, predictions and plot tables of each model.

    Raises:
        FileNotFoundError: a model's file is missing (the message names the file and the stage that writes it).
        ReportInputError: a file lacks required keys or columns.
    """
    results = []
    for name in models:
        record = _read_json(_require_file(inputs.metrics_dir / f"{name}.json", name), REQUIRED_RECORD_KEYS)
        predictions = metrics.read_predictions(_require_file(inputs.predictions_dir / f"{name}.csv", name))
        plots = inputs.plots_dir / name
        tables = {
            stem: _read_csv(_require_file(plots / f"{stem}.csv", name), columns)
            for stem, columns in (
                ("roc", ("fpr", "tpr")),
                ("pr", ("recall", "precision")),
                ("calibration", ("mean_predicted", "fraction_positive", "count")),
            )
        }
        results.append(ModelResult(name, record, predictions, tables["roc"], tables["pr"], tables["calibration"]))
    return results


# --------------------------------------------------------------------------------------------------- comparisons


def paired_predictions(a: ModelResult, b: ModelResult, predictions_dir: Path) -> pd.DataFrame:
    """Join two models' predictions on ``source`` (columns ``y_true, patient_id, prob_a, pred_a, prob_b, pred_b``).

    Raises:
        ReportInputError: the two files do not cover the same test images with the same labels.
    """
    left = a.predictions.set_index("source")
    right = b.predictions.set_index("source")
    if set(left.index) != set(right.index) or len(left) != len(right):
        raise ReportInputError(
            f"{predictions_dir / (a.name + '.csv')} and {predictions_dir / (b.name + '.csv')} cover different test "
            f"images ({len(left)} vs {len(right)} rows, {len(set(left.index) ^ set(right.index))} not shared); "
            "re-run both evaluations on the same splits.csv"
        )
    right = right.loc[left.index]
    if not (left["y_true"].to_numpy() == right["y_true"].to_numpy()).all():
        raise ReportInputError(f"{predictions_dir}: {a.name}.csv and {b.name}.csv disagree on y_true")
    return pd.DataFrame(
        {
            "y_true": left["y_true"].to_numpy(),
            "patient_id": left["patient_id"].to_numpy(),
            "prob_a": left["prob"].to_numpy(),
            "pred_a": left["pred"].to_numpy(),
            "prob_b": right["prob"].to_numpy(),
            "pred_b": right["pred"].to_numpy(),
        },
        index=left.index,
    )


@dataclass(frozen=True)
class Comparison:
    """Paired tests of ``reference`` against ``other`` on the same test images."""

    reference: str
    other: str
    n: int
    mcnemar: metrics.McNemarResult
    delong: metrics.DeLongResult | None
    bootstrap: metrics.PairedBootstrapResult
    mcnemar_p_holm: float | None = None
    delong_p_holm: float | None = None


def compare(a: ModelResult, b: ModelResult, predictions_dir: Path, *, n_resamples: int, seed: int) -> Comparison:
    """McNemar, DeLong and the paired patient bootstrap of ``a`` against ``b`` (no multiplicity adjustment)."""
    joined = paired_predictions(a, b, predictions_dir)
    y = joined["y_true"].to_numpy()
    try:
        delong = metrics.delong_test(y, joined["prob_a"].to_numpy(), joined["prob_b"].to_numpy())
    except metrics.MetricsInputError:
        delong = None  # fewer than two images of a class: DeLong's variance is not estimable (shown as n/a)
    return Comparison(
        reference=a.name,
        other=b.name,
        n=len(joined),
        mcnemar=metrics.mcnemar_exact(y, joined["pred_a"].to_numpy(), joined["pred_b"].to_numpy()),
        delong=delong,
        bootstrap=metrics.paired_bootstrap_auc(
            y, joined["prob_a"].to_numpy(), joined["prob_b"].to_numpy(), joined["patient_id"].to_numpy(),
            n_resamples=n_resamples, seed=seed,
        ),
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


def paired_tests(
    results: Sequence[ModelResult], predictions_dir: Path, *, n_resamples: int, seed: int
) -> list[Comparison]:
    """:data:`REFERENCE_MODEL` against every other model, with Holm-adjusted McNemar and DeLong p-values."""
    by_name = {r.name: r for r in results}
    if REFERENCE_MODEL not in by_name:
        return []
    ref = by_name[REFERENCE_MODEL]
    raw = [compare(ref, r, predictions_dir, n_resamples=n_resamples, seed=seed) for r in results if r is not ref]
    mc = holm([c.mcnemar.p_value for c in raw])
    dl = holm([c.delong.p_value if c.delong else None for c in raw])
    return [
        Comparison(c.reference, c.other, c.n, c.mcnemar, c.delong, c.bootstrap, m, d) for c, m, d in zip(raw, mc, dl)
    ]


@dataclass(frozen=True)
class BaselineCheck:
    """Is a CNN's test ROC-AUC above the baseline's? With the paired patient-bootstrap difference and reasons."""

    model: str
    auc: float | None
    baseline_auc: float | None
    above: bool | None
    difference: metrics.PairedBootstrapResult
    reasons: list[str] = field(default_factory=list)


def baseline_checks(
    results: Sequence[ModelResult],
    params: Params,
    splits: pd.DataFrame,
    predictions_dir: Path,
) -> list[BaselineCheck]:
    """For every CNN: ROC-AUC against the baseline's, and, where it is not above, what in its setup explains it."""
    by_name = {r.name: r for r in results}
    base = by_name[BASELINE]
    train = splits[splits["split"] == "train"]
    checks = []
    for r in results:
        if r.name == BASELINE:
            continue
        cmp = compare(r, base, predictions_dir, n_resamples=params.evaluate.bootstrap, seed=params.evaluate.seed)
        auc, base_auc = r.record["roc_auc"], base.record["roc_auc"]
        above = None if auc is None or base_auc is None else bool(auc > base_auc)
        reasons = []
        if not above:
            cfg = params.train.model(r.name)
            if cfg.weights == "none":
                reasons.append(f"trained from scratch (`train.{r.name}.weights: none`, no ImageNet weights)")
            reasons.append(
                f"at most {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} (`train.{r.name}.epochs`; early "
                "stopping may end sooner) "
                f"at {cfg.image_size} px on {len(train)} training images of {train['patient_id'].nunique()} "
                "patients (plus their augmented copies)"
            )
            if r.name.startswith("vgg") and cfg.weights == "none":
                # Simonyan & Zisserman 2015; torchvision lists 138 M (VGG-16) and 144 M (VGG-19) parameters.
                reasons.append("VGG has over 130 million parameters and no batch normalisation: it barely starts "
                               "to learn from scratch on a cohort of this size")
        interval = cmp.bootstrap.interval
        if interval.low is not None and interval.low <= 0.0 <= interval.high:
            reasons.append(
                f"the difference is within sampling noise: paired patient-bootstrap 95 % CI of the AUC difference "
                f"[{interval.low:+.3f}, {interval.high:+.3f}] includes 0"
            )
        checks.append(BaselineCheck(r.name, auc, base_auc, above, cmp.bootstrap, reasons))
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


# --------------------------------------------------------------------------------------------------- data, lineage


def data_summary(inputs: ReportInputs, classes: Sequence[str]) -> dict[str, Any]:
    """Counts per class and split, quarantined files with reasons, and the validation verdict.

    Quarantined files are shown by content hash, never by name (names of real cohorts can carry identifiers).
    """
    ingest = _read_json(inputs.ingest_summary, ("n_files", "n_accepted", "n_quarantined", "quarantine_rate"))
    validation = _read_json(inputs.validation, ("success", "blocking_failures", "warnings"))
    split_summary = _read_json(inputs.split_summary, ("n_images", "n_patients"))
    manifest = _read_csv(inputs.manifest, ("sha256", "status", "reason", "format"), text=True)
    splits = _read_csv(inputs.splits, ("patient_id", "label", "split"), text=True)
    images = pd.crosstab(splits["split"], splits["label"]).reindex(
        index=["train", "val", "test"], columns=list(classes), fill_value=0
    )
    patients = splits.groupby("split")["patient_id"].nunique().reindex(["train", "val", "test"], fill_value=0)
    rows = [
        {"split": s, **{c: int(images.at[s, c]) for c in classes}, "total": int(images.loc[s].sum()),
         "patients": int(patients[s])}
        for s in ["train", "val", "test"]
    ]
    quarantined = manifest[manifest["status"] == "quarantined"].sort_values("sha256")
    reasons = quarantined["reason"]
    return {
        "ingest": ingest,
        "validation": validation,
        "split_summary": split_summary,
        "split_rows": rows,
        "patients_in_several_splits": int((splits.groupby("patient_id")["split"].nunique() > 1).sum()),
        "quarantined": [
            {"file": f"{sha[:12]}", "format": fmt, "reason": reason}
            for sha, fmt, reason in zip(quarantined["sha256"], quarantined["format"], reasons)
        ],
        "quarantine_reasons": reasons.str.split(":").str[0].value_counts().sort_index().to_dict(),
    }


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
    """ROC, precision-recall, calibration and confusion-matrix figures as base64 PNG, keyed by name."""
    out = {}
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    for r in results:
        ax.plot(r.roc["fpr"], r.roc["tpr"], label=_label(r, "roc_auc"))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)",
           title="ROC curves, test split (legend: ROC-AUC)", xlim=(0, 1), ylim=(0, 1.02))
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
    ax.set(xlabel=f"Mean predicted P({classes[1]})", ylabel=f"Observed fraction {classes[1]}", xlim=(0, 1),
           ylim=(0, 1), title=f"Calibration ({metrics.CALIBRATION_BINS} bins; legend: Brier score)")
    ax.legend(fontsize=8, loc="upper left")
    out["calibration"] = _png_base64(fig)

    cols = min(3, len(results))
    rows = math.ceil(len(results) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, results):
        cm = np.array([[r.record["tn"], r.record["fp"]], [r.record["fn"], r.record["tp"]]])
        top = max(int(cm.max()), 1)
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=top)  # a fixed 0 floor keeps light cells light in every panel
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
        ax.set_xticks([0, 1], labels=list(classes), fontsize=8)
        ax.set_yticks([0, 1], labels=list(classes), fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("actual", fontsize=8)
        ax.set_title(r.name, fontsize=9)
    fig.tight_layout()
    out["confusion"] = _png_base64(fig)
    return out


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


def build_context(params: Params, inputs: ReportInputs) -> dict[str, Any]:
    """Everything the templates show, computed from the inputs.

    Raises:
        FileNotFoundError: a model's metrics, predictions or plot file is missing (named in the message).
        ReportInputError: an input lacks keys/columns or two models were scored on different test images.
    """
    models = [*params.train.models, BASELINE]
    results = load_results(models, inputs)
    classes = params.data.classes
    splits = _read_csv(inputs.splits, ("patient_id", "label", "split"), text=True)
    rep = params.report
    reported = {"accuracy": rep.paper_accuracy, "precision": rep.paper_precision, "recall": rep.paper_recall,
                "f1": rep.paper_f1}
    # F1 is the harmonic mean of precision and recall: recomputing it checks the paper's internal consistency.
    paper_f1_from_pr = 2 * rep.paper_precision * rep.paper_recall / (rep.paper_precision + rep.paper_recall)
    test = results[0].predictions
    cnn_results = [r for r in results if r.name != BASELINE]
    best = max((r for r in cnn_results if r.record["roc_auc"] is not None), key=lambda r: r.record["roc_auc"],
               default=None)
    # Per model, the metrics some bootstrap resamples left undefined, with how many resamples (e.g. "roc_auc 3").
    skipped = {
        r.name: [f"{k} {r.record[f'{k}_ci_skipped']}" for k in metrics.METRIC_KEYS if r.record.get(f"{k}_ci_skipped")]
        for r in results
    }
    skipped = {name: items for name, items in skipped.items() if items}
    return {
        "params": params,
        "classes": classes,
        "models": models,
        "results": results,
        "metric_keys": metrics.METRIC_KEYS,
        "metric_labels": METRIC_LABELS,
        "paper_keys": PAPER_KEYS,
        "reported": reported,
        "audit": reconstruct_paper_confusion(rep.paper_accuracy, rep.paper_precision, rep.paper_recall,
                                             rep.paper_n_images),
        "paper_n_images": rep.paper_n_images,
        "paper_max_n": PAPER_MAX_TEST_SIZE,
        "paper_f1_from_pr": paper_f1_from_pr,
        "paper_f1_consistent": _matches(paper_f1_from_pr, rep.paper_f1),
        "test": {
            "n": len(test),
            "patients": int(test["patient_id"].nunique()),
            "positives": int(test["y_true"].sum()),
            "negatives": int(len(test) - test["y_true"].sum()),
        },
        "best": best,
        "skipped": skipped,
        "comparisons": paired_tests(results, inputs.predictions_dir, n_resamples=params.evaluate.bootstrap,
                                    seed=params.evaluate.seed),
        "reference": REFERENCE_MODEL,
        "checks": baseline_checks(results, params, splits, inputs.predictions_dir),
        "data": data_summary(inputs, classes),
        "synthetic": Path(params.data.source).as_posix().rstrip("/") == SYNTHETIC_SOURCE,
        "git_commit": git_commit(inputs.repo),
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
    html = env.get_template("comparison.html.j2").render(body=body, css=_CSS, title="spinedxa model comparison")
    return markdown, html


def write_report(params: Params, inputs: ReportInputs, out_md: str | Path, out_html: str | Path) -> dict[str, Any]:
    """Build the report and write ``comparison.md`` and ``comparison.html`` (atomically); return the context."""
    context = build_context(params, inputs)
    markdown, html = render(context)
    write_text_atomic(out_md, markdown)
    write_text_atomic(out_html, html)
    return context
