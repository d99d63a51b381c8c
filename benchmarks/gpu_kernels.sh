#!/usr/bin/env bash
# On an H100: the CUDA tests (Triton kernels included) and the kernel benchmark: fused Triton
# paper/head_groups mode, the straightforward per-(branch, offset) SDPA path, and dense SDPA,
# in one run on one device. Usage: bash benchmarks/gpu_kernels.sh OUTDIR
set -uo pipefail
out=${1:-bench-results}; mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
b="python3 -m dilated_attention.bench --device cuda --budget-s 1"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest tests/test_core.py tests/test_triton.py -q -p no:cacheprovider -k "cuda or launches" 2>&1 | tail -4
$b --modes paper paper:sdpa head_groups --seq-lens 32768 131072 524288 1048576 --dense-max-n 524288 --json "$out/kern-fwd.json"
$b --modes paper head_groups --seq-lens 4194304 8388608 --dense-max-n 1 --json "$out/kern-fwd-8m.json"
$b --modes paper paper:sdpa head_groups --backward --seq-lens 32768 131072 524288 1048576 --dense-max-n 131072 --json "$out/kern-fwdbwd.json"
$b --modes paper head_groups --causal --seq-lens 131072 1048576 --dense-max-n 131072 --json "$out/kern-fwd-causal.json"
$b --modes paper paper:sdpa --head-dim 128 --seq-lens 131072 1048576 --dense-max-n 131072 --json "$out/kern-fwd-d128.json"
