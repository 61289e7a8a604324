#!/usr/bin/env bash
# Start one `mlflow server` on loopback for a whole cluster run: workflow/cluster/mlflow-up.sh STATE_DIR
# then `source STATE_DIR/mlflow.env` (MLFLOW_TRACKING_URI) before submitting; workflow/cluster/down.sh STATE_DIR stops it.
#
# SQLite backend (STATE_DIR/mlflow/mlflow.db) and a local artifact root served by the server itself
# (--artifacts-destination STATE_DIR/mlflow/artifacts: clients read and write artifacts over HTTP, so a job on any node
# that reaches the server can log and load models). Waits until /health answers. Uses `mlflow` from PATH (the
# project's virtual environment). Environment: MLFLOW_WORKERS (default 2), MLFLOW_UP_TIMEOUT (default 300 s: each
# worker imports MLflow, slow on a busy 2-core machine).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

STATE=$(state_dir "${1:-}")
command -v mlflow >/dev/null 2>&1 || die "no mlflow on PATH (activate the project's virtual environment: make install)"
trap 'status=$?; [ $status -eq 0 ] || "$here/down.sh" "$STATE" >&2 || true; exit $status' EXIT
mkdir -p "$STATE/mlflow/artifacts"
port=$(free_port)
uri="http://127.0.0.1:$port"
MLFLOW_DISABLE_TELEMETRY=true start_bg "$STATE" mlflow mlflow server \
  --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" --artifacts-destination "$STATE/mlflow/artifacts" \
  --host 127.0.0.1 --port "$port" --workers "${MLFLOW_WORKERS:-2}"
wait_http "$uri/health" "${MLFLOW_UP_TIMEOUT:-300}" "$STATE" mlflow
echo "export MLFLOW_TRACKING_URI=$uri" >"$STATE/mlflow.env"
echo "MLflow server up at $uri (store $STATE/mlflow); source $STATE/mlflow.env"
