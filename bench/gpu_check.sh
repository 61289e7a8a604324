#!/usr/bin/env bash
# GPU check of the paper profile, a few minutes on a machine with NVIDIA GPUs: bench/gpu_check.sh [--models M ...]
#
# 1. One GPU: one fold's worth of training at the paper profile's sizes through the CUDA AMP path (ResNet-50 at
#    224 px and InceptionV3 at 299 px by default): training and validation images/s, peak GPU memory, with and without
#    the CPU's online augmentation (bench/gpu_check.py --single).
# 2. torchrun, one process per GPU (up to 8, a divisor of the batch size): spinedxa's DDP path with the NCCL backend,
#    two epochs of `spinedxa.loop.fit`, and a check that every rank ends with the same weights (--ddp).
# Writes reports/bench/gpu.json (GPU_CHECK_OUT overrides). Without a CUDA device it stops at once, exit status 3, with
# the reason. Every step has a time limit (GPU_CHECK_TIMEOUT seconds each, default 900): a hung NCCL
# rendezvous ends in an error, never a hang. Uses .venv/bin/python when present, else python3 (PYTHON overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${GPU_CHECK_OUT:-reports/bench/gpu.json}
LIMIT=${GPU_CHECK_TIMEOUT:-900}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spinedxa-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The device first, before anything is written: a clear message and status 3 when there is none.
if ! "$PYTHON" - <<'EOF'
import sys
import torch
if torch.version.cuda is None:
    sys.exit(f"gpu_check: no CUDA device: torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none "
             "(no NVIDIA driver, no GPU, or CUDA_VISIBLE_DEVICES hides them)")
EOF
then
  command -v nvidia-smi >/dev/null 2>&1 && { nvidia-smi -L >&2 || echo "gpu_check: nvidia-smi failed too" >&2; }
  exit 3
fi
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"

echo "== one GPU: paper profile, CUDA AMP path, one fold" >&2
timeout "$LIMIT" "$PYTHON" bench/gpu_check.py --single --workdir "$WORK" --out "$OUT" "$@"

# One process per GPU, up to 8, and a divisor of the batch size (32 in profiles/paper.yaml; spinedxa.train refuses
# a batch that does not split evenly across ranks).
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
nproc=1
for n in 8 4 2; do
  if [ "$gpus" -ge "$n" ]; then nproc=$n; break; fi
done
echo "== torchrun: DDP with NCCL on $nproc of $gpus GPU(s)" >&2
# --standalone: a rendezvous on this machine only (loopback), no port to choose.
timeout "$LIMIT" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  bench/gpu_check.py --ddp --workdir "$WORK" --out "$OUT" "$@"
echo "wrote $OUT" >&2
