#!/usr/bin/env bash
# Start an S3-compatible object store on loopback (moto's server, pure Python from PyPI): workflow/cluster/s3-up.sh
# STATE_DIR, then `source STATE_DIR/s3.env` (S3_ENDPOINT_URL); workflow/cluster/down.sh STATE_DIR stops it.
#
# For trying the DVC remote workflow (docs/SCALE_OUT.md) and for the tests: objects live in the server's memory and
# are gone when it stops. It accepts any credentials; DVC (boto) reads them from AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY in the environment, never from a committed file. Uses `moto_server` from PATH (the project's
# virtual environment, extra `dev`). Environment: S3_UP_TIMEOUT (default 120 s).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

STATE=$(state_dir "${1:-}")
command -v moto_server >/dev/null 2>&1 ||
  cannot "no moto_server on PATH (pip install -e '.[dev]' installs moto[server])"
trap 'status=$?; [ $status -eq 0 ] || "$here/down.sh" "$STATE" >&2 || true; exit $status' EXIT
port=$(free_port)
url="http://127.0.0.1:$port"
start_bg "$STATE" s3 moto_server -H 127.0.0.1 -p "$port"
wait_http "$url/moto-api/" "${S3_UP_TIMEOUT:-120}" "$STATE" s3
echo "export S3_ENDPOINT_URL=$url" >"$STATE/s3.env"
echo "S3-compatible server (moto) up at $url; source $STATE/s3.env"
