#!/usr/bin/env bash
# `make cluster-test`: the scale-out checks of tests/test_cluster.py against real daemons on loopback: a one-node
# Slurm cluster running the tiny DAG through Snakemake's Slurm executor, one MLflow server for all its jobs, the same
# DAG under `dvc repro` as the reference, and the results pushed to an S3-compatible DVC remote and pulled into a
# fresh clone. The daemons live in a fresh state directory; the tests stop them (down.sh) and so does this script's
# trap, on success, failure or interruption. Extra arguments go to pytest. Exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# Not under pytest's 0700 temporary directories: munged needs every directory above its socket traversable.
STATE=$(mktemp -d "${TMPDIR:-/tmp}/spinedxa-cluster.XXXXXX")
chmod 0755 "$STATE"
status=1
finish() {
  workflow/cluster/down.sh "$STATE" >/dev/null || { echo "cluster-test: down.sh $STATE failed" >&2; return; }
  # Passed: free the daemons' data (S3 objects, MLflow artifacts: GBs), keep the logs.
  if [ "$status" -eq 0 ]; then find "$STATE" -mindepth 1 -maxdepth 1 ! -name log -exec rm -rf {} +; fi
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SPINEDXA_CLUSTER_STATE=$STATE "$PYTHON" -m pytest -m slow tests/test_cluster.py "$@"
status=$?
if [ -f "$STATE/log/summary.json" ]; then
  echo "== measured (also in $STATE/log/summary.json)"
  cat "$STATE/log/summary.json"
fi
echo "logs: $STATE/log"
exit $status
