"""The ``spinedxa`` command: workflows that use the pipeline's results.

    spinedxa profile run profiles/paper.yaml [-n N] a DVC experiment with the profile (params.yaml stays the default)
    spinedxa profile show profiles/tiny.yaml        the profile as `dvc exp run -S` values, validated
    spinedxa profile apply profiles/tiny.yaml       merge it into params.yaml in place (throwaway copies, tests)
    spinedxa audit reports/metrics/resnet50.json    lineage of a metric (every fold's model) back to the raw files
    spinedxa audit --leakage [--splits PATH]        patients, files, near-duplicates or augmentations across the
                                                    roles of a fold; k-fold coverage
    spinedxa predict --model models/resnet50 scan.dcm scans/ [--csv out.csv] [--gradcam-dir DIR]
                                                    the mean of the fold models' probabilities (a fold directory,
                                                    models/resnet50/fold0, predicts alone)
    spinedxa weights fetch resnet50 [vgg16 ...] [--batch-norm] [--url URL]
                                                    torchvision's ImageNet weights into weights/<model>/, once:
                                                    checked against the published sha256 prefix, recorded, dvc add-ed
    spinedxa weights import resnet50 FILE [--name NAME] [--origin URL] [--batch-norm]
                                                    a local state dict (RadImageNet, a lab's own), the same way

Exit codes: 0 success; 1 the audit found a mismatch or a leak, predict could use none of the files, or weights were
refused (download failed, hash, size or layers do not match: nothing kept); 2 the command could not run (bad
arguments, a missing or malformed input, invalid params), with a message naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path, PurePosixPath
from typing import Sequence

from spinedxa.config import ConfigError, apply_profile, load_params, profile_overrides

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


def _profile(args: argparse.Namespace) -> int:
    """Profiles keep params.yaml the committed default: ``run`` is a DVC experiment (``dvc exp run -S``), ``show``
    prints its values, and only ``apply`` rewrites params.yaml (with a header naming the profile, so the overlay is
    explicit; ``git checkout params.yaml`` reverts it)."""
    if args.action == "apply":
        apply_profile(args.params, args.profile)
        print(f"{args.params}: profile {args.profile} applied (revert with `git checkout {args.params}`)")
        return EXIT_OK
    overrides = profile_overrides(args.params, args.profile)
    if args.action == "show":
        print("\n".join(overrides))
        return EXIT_OK
    import subprocess

    cmd = ["dvc", "exp", "run", *(["-n", args.name] if args.name else []), *(a for o in overrides for a in ("-S", o))]
    print(" ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=False).returncode


def _audit(args: argparse.Namespace) -> int:
    from spinedxa import audit

    root = Path(args.root)
    results: dict[str, object] = {}
    ok = True
    if args.metrics is not None:
        lineage = audit.audit_lineage(args.metrics, root, args.params, check_mlflow=args.mlflow)
        results["lineage"] = lineage.to_dict()
        ok &= lineage.ok
        if not args.json:
            print(audit.format_lineage(lineage))
    if args.leakage:
        params = load_params(root / args.params)
        defaults = audit.default_leakage_paths(root)
        # The default augmentation index belongs to the default split: another split file (e.g. the replay
        # ablation's) is audited with the index given alongside it, or without one.
        augmented = args.augmented or (None if args.splits else defaults["augmented"])
        augmented = None if args.no_augmented or augmented is None else Path(augmented)
        leakage = audit.audit_leakage(
            args.splits or defaults["splits"], args.manifest or defaults["manifest"], augmented, params.validate
        )
        results["leakage"] = leakage.to_dict()
        ok &= leakage.ok
        if not args.json:
            print(audit.format_leakage(leakage))
    if args.json:
        print(json.dumps({**results, "ok": ok}, indent=2, sort_keys=True, default=str))
    return EXIT_OK if ok else EXIT_FAILED


def _predict(args: argparse.Namespace) -> int:
    from spinedxa import predict

    params = load_params(args.params)
    files = predict.collect_files(args.inputs)
    if not files:
        raise FileNotFoundError(f"no files found in {args.inputs}")
    ensemble = predict.load_ensemble(args.model, args.device)
    print(f"spinedxa predict: {ensemble.describe()}", file=sys.stderr)
    rows = predict.predict_files(ensemble, files, params, gradcam_dir=args.gradcam_dir, device=args.device)
    for row in rows:
        if row.status != "ok":
            print(f"error: {row.file}: {row.error}", file=sys.stderr)
    if args.csv:
        predict.write_csv(args.csv, rows, ensemble.classes)
        n_ok = sum(r.status == "ok" for r in rows)
        print(f"{args.csv}: {n_ok} of {len(rows)} file(s) predicted")
    else:
        sys.stdout.write(predict.to_csv(rows, ensemble.classes))
    return EXIT_OK if any(r.status == "ok" for r in rows) else EXIT_FAILED


def _weights(args: argparse.Namespace) -> int:
    from spinedxa import weights

    if args.action == "fetch" and args.url and len(args.models) > 1:
        raise ValueError(f"--url names one file; fetch {args.models} one at a time")
    try:
        if args.action == "fetch":
            sources = [weights.fetch(m, batch_norm=args.batch_norm, root=args.root, url=args.url) for m in args.models]
            value = "imagenet"
        else:
            sources = [weights.import_file(args.models[0], args.file, batch_norm=args.batch_norm, root=args.root,
                                           name=args.name, origin=args.origin)]
            value = sources[0].path
    except weights.WeightsError as exc:
        print(f"spinedxa weights {args.action}: refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for source in sources:
        rel = PurePosixPath(source.path)
        print(f"{source.path}: {source.variant}, sha256 {source.sha256}; recorded in {rel.name}.json, tracked by DVC "
              f"({rel.name}.dvc)\n  commit: git add {rel.parent}/{rel.name}.json {rel.parent}/{rel.name}.dvc "
              f"{rel.parent}/.gitignore; then `dvc push`\n  use: train.{source.model}.weights: {value}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``spinedxa`` command."""
    parser = argparse.ArgumentParser(
        prog="spinedxa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="run, show or apply a profile (e.g. profiles/paper.yaml), validated")
    p.add_argument("action", choices=("run", "show", "apply"),
                   help="run: a DVC experiment with the profile's values; show: print them; apply: rewrite params.yaml")
    p.add_argument("profile", help="profile YAML (an overlay of params.yaml)")
    p.add_argument("-n", "--name", help="experiment name (run)")
    p.add_argument("--params", default="params.yaml", help="params file to update in place (default: params.yaml)")
    p.set_defaults(func=_profile)

    a = sub.add_parser("audit", help="verify a metric's lineage, or check the splits for leakage")
    a.add_argument("metrics", nargs="?", help="metrics JSON written by evaluate, e.g. reports/metrics/resnet50.json")
    a.add_argument("--leakage", action="store_true", help="check the splits for leakage")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("--root", default=".", help="repository root (default: the working directory)")
    a.add_argument("--params", default="params.yaml", help="params file relative to --root")
    a.add_argument("--mlflow", action="store_true",
                   help="also check that the parent MLflow run and every fold's run exist in the store")
    a.add_argument("--splits", help="split table in the splits contract (default: data/split/splits.csv), e.g. "
                   "reports/replay/leaky_split.csv")
    a.add_argument("--manifest", help="ingest manifest (default: data/ingested/manifest.csv)")
    a.add_argument("--augmented", help="augmentation index (default: data/augmented/index.csv when --splits is not "
                   "given; with --splits, none unless given)")
    a.add_argument("--no-augmented", action="store_true", help="skip the augmentation check")
    a.set_defaults(func=_audit)

    r = sub.add_parser("predict", help="probability of osteoporosis for new DICOM/PNG/JPEG/TIFF files")
    r.add_argument("--model", required=True,
                   help="models/<model> (the ensemble of its fold models: mean probability) or one fold directory, "
                        "models/<model>/fold<k> (or its model.pt)")
    r.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="files, or directories searched recursively")
    r.add_argument("--csv", help="write the rows to this CSV instead of standard output")
    r.add_argument("--gradcam-dir", help="write a Grad-CAM overlay PNG per file into this directory (on the model "
                   "input, the ROI; the mean of the fold models' maps)")
    r.add_argument("--params", default="params.yaml", help="params file (ingest settings, threshold)")
    r.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    r.set_defaults(func=_predict)

    w = sub.add_parser("weights", help="bring pre-trained weights into the project once (verified, recorded, DVC)")
    wsub = w.add_subparsers(dest="action", required=True)
    f = wsub.add_parser("fetch", help="download torchvision's ImageNet weights of the models into weights/<model>/")
    f.add_argument("models", nargs="+", metavar="MODEL", help="resnet50, vgg16, vgg19, inception_v3")
    f.add_argument("--url", help="download from here instead (a mirror, or file:// of a local copy); the published "
                   "file name and sha256 prefix still decide")
    i = wsub.add_parser("import", help="bring a local state dict (RadImageNet, a lab's own) into weights/<model>/")
    i.add_argument("models", nargs=1, metavar="MODEL", help="the model it initialises")
    i.add_argument("file", type=Path, help="the state dict (torch.save of a state dict; weights only)")
    i.add_argument("--name", help="its file name in weights/<model>/ (default: its own)")
    i.add_argument("--origin", help="where it came from (a URL, a citation): recorded as its url")
    for parser_ in (f, i):
        parser_.add_argument("--batch-norm", action="store_true",
                             help="VGG's BatchNorm variant (train.<model>.batch_norm: true)")
        parser_.add_argument("--root", default=".", help="project root (holds .dvc/; default: the working directory)")
    w.set_defaults(func=_weights)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spinedxa`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "audit" and args.metrics is None and not args.leakage:
        parser.error("audit: give a metrics file (reports/metrics/<model>.json), --leakage, or both")  # exits 2
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        # Inputs the command cannot use (AuditError, DagError and a model that does not load are ValueError or
        # RuntimeError): one line naming the file instead of a traceback.
        print(f"spinedxa {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
