#!/usr/bin/env bash
# On a CUDA machine: the whole test suite, the pattern-cache benchmark, the ring benchmark at P = 1
# (NCCL) and the demo through torchrun. Usage: bash benchmarks/gpu_all.sh OUTDIR
set -uo pipefail
out=${1:-bench-results}; mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest tests -q -p no:cacheprovider 2>&1 | tail -6
python3 benchmarks/pattern_cache.py --device cuda --json "$out/pattern-cache-cuda.json"
python3 benchmarks/ring.py --device cuda --worlds 1 --seq-len 1048576 --heads 12 \
  --segment-lengths 2048 4096 8192 16384 32768 --json "$out/ring-cuda.json"
torchrun --nproc-per-node 1 -m dilated_attention.demo --device cuda --dtype bfloat16 --seq-len 1048576 --heads 12 \
  --segment-lengths 2048 4096 8192 16384 32768
