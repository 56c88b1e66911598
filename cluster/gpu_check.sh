#!/usr/bin/env bash
# GPU check: paper-scale image ET (D 768, H 12, Y 64, M 3072, N 197, T 12), bf16 + DeepSpeed ZeRO-2, synthetic data,
# analytic and autograd gradients; prints images/s, peak GPU memory and MFU. Finishes in under 5 minutes.
#   cluster/gpu_check.sh                 # one GPU (world 1; the rendezvous env is set here, loopback only)
#   NGPU=8 cluster/gpu_check.sh          # all GPUs of this node under torchrun
#   cluster/gpu_check.sh --steps 100 --batch 32 --peak-tflops 989
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
NGPU="${NGPU:-1}"
LIMIT_S="${GPU_CHECK_TIMEOUT_S:-290}"
unset DS_ACCELERATOR  # let DeepSpeed select CUDA (tests set it to cpu)

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device is visible to $PY (torch.cuda.is_available() is False); run this on a GPU node" >&2
  exit 2
fi

if [ "$NGPU" -gt 1 ]; then
  exec timeout "$LIMIT_S" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" \
    -m etbench.bench.gpu_check "$@"
fi
export MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29533}" RANK=0 WORLD_SIZE=1 LOCAL_RANK=0
exec timeout "$LIMIT_S" "$PY" -m etbench.bench.gpu_check "$@"
