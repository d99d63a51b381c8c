#!/usr/bin/env bash
# On a CUDA machine: the test suite (CUDA cases included) and the core benchmark against dense SDPA.
# Usage: bash benchmarks/gpu_core.sh OUTDIR
set -uo pipefail
out=${1:-bench-results}; mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tail -15
[ -n "${SKIP_FWD:-}" ] || python3 -m dilated_attention.bench --device cuda --modes paper head_groups --json "$out/core-fwd.json"
[ -n "${SKIP_FWD:-}" ] || python3 -m dilated_attention.bench --device cuda --modes paper head_groups --causal --dense-max-n 131072 --json "$out/core-fwd-causal.json"
python3 -m dilated_attention.bench --device cuda --modes paper head_groups --backward --seq-lens 32768 131072 524288 --dense-max-n 131072 --json "$out/core-fwdbwd.json"
