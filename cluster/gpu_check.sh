#!/usr/bin/env bash
# GPU check (etbench/bench/gpu_check.py): the paper-scale image ET (D 768, H 12, Y 64, M 3072, N 197, T 12) train
# step in bf16 (DeepSpeed ZeRO-2) for both gradient modes beside a FLOP-matched ViT — images/s, peak memory, MFU —
# then `bench core` on cuda with its XLA reference step; one JSON ($OUT/gpu_check.json when $OUT is set, else
# results/gpu_check.json), in about 5 minutes. Runs from a plain checkout (PYTHONPATH=., no install of etbench):
#   bash cluster/gpu_check.sh                       # one GPU
#   NGPU=8 bash cluster/gpu_check.sh                # the image section on all 8 GPUs of this node (torchrun)
#   bash cluster/gpu_check.sh --steps 50 --batch 128 --peak-tflops 989
# On a bare CUDA image (no pydantic, no DeepSpeed, no index to install from), first run `make gpu-bundle` where pip
# works and bring .whl/ along: the wheels the image lacks are installed into a temporary directory here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
BUNDLE="${GPU_BUNDLE:-.whl}"
LIMIT_S="${GPU_CHECK_TIMEOUT_S:-420}"   # hard stop; the check budgets its sections to 300 s itself
unset DS_ACCELERATOR                    # let DeepSpeed select CUDA (the test suite sets it to cpu)
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX must not take 75 % of the GPU's memory from torch

if [ -d "$BUNDLE" ]; then
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/etbench-gpu-site.XXXXXX")"
  trap 'rm -rf "$SITE"' EXIT
  "$PY" -m etbench.cluster.gpu_bundle install "$BUNDLE" "$SITE"
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi

cpu=0
for a in "$@"; do case "$a" in cpu|--device=cpu) cpu=1 ;; esac; done  # `--device cpu --tiny`: the tests' smoke run
if [ "$cpu" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device is visible to $PY (torch.cuda.is_available() is False); run this on a GPU node" \
       "(or pass --device cpu --tiny for the CPU smoke run)" >&2
  exit 2
fi
"$PY" -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ('pydantic', 'deepspeed', 'hjson')) else 1)" \
  || echo "gpu_check: warning: $PY finds no pydantic / deepspeed / hjson (no $BUNDLE/? run \`make gpu-bundle\` where" \
          "pip works and bring $BUNDLE along); the check will record what fails" >&2

timeout --kill-after=20 "$LIMIT_S" "$PY" -m etbench.bench.gpu_check --ngpu "${NGPU:-1}" "$@"
