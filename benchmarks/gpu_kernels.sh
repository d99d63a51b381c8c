#!/usr/bin/env bash
# On one or two H100s: the CUDA tests (Triton kernels included), the ring on the Triton kernels
# over NCCL (when 2 GPUs), and the kernel benchmark of the kernel issue: ours (paper, head_groups),
# the straightforward per-(branch, offset) SDPA path, the seed project's DilatedAttention (its
# public source in SEED_DIR, see benchmarks/seed_peer.py) and dense SDPA, on one device.
# Usage: bash benchmarks/gpu_kernels.sh OUTDIR [SEED_DIR] [fwd|bwd|all]   (fwd and bwd fit one 10-minute call each)
set -uo pipefail
out=${1:-bench-results}; seed=${2:-.peers}; part=${3:-all}; mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
b="python3 benchmarks/seed_peer.py --seed-path $seed --device cuda --budget-s 1"
if [ "$part" != bwd ]; then
  python3 -m pytest tests/test_core.py tests/test_modules.py tests/test_validation.py tests/test_triton.py \
    -q -p no:cacheprovider -k "not interpreter" 2>&1 | tail -3
  if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    python3 benchmarks/multi_gpu_check.py --world 2 --seq-len 32768 2>&1 | grep -E "^rank 0|passed|Error|FAIL"
  fi
  $b --modes paper paper:sdpa head_groups seed --seq-lens 32768 131072 524288 1048576 --dense-max-n 524288 --json "$out/kern-fwd.json"
  $b --modes paper head_groups seed --seq-lens 4194304 8388608 --dense-max-n 1 --json "$out/kern-fwd-8m.json"
  $b --modes paper head_groups seed --causal --seq-lens 131072 1048576 --dense-max-n 131072 --json "$out/kern-fwd-causal.json"
  $b --modes paper paper:sdpa head_groups seed --head-dim 128 --seq-lens 131072 1048576 --dense-max-n 131072 --json "$out/kern-fwd-d128.json"
fi
if [ "$part" != fwd ]; then
  $b --modes paper paper:sdpa head_groups seed --backward --seq-lens 32768 131072 1048576 --dense-max-n 131072 --json "$out/kern-fwdbwd.json"
  $b --modes paper head_groups --backward --seq-lens 4194304 6291456 8388608 --dense-max-n 1 --json "$out/kern-fwdbwd-8m.json"
  $b --modes paper head_groups seed --causal --backward --seq-lens 1048576 --dense-max-n 1 --json "$out/kern-fwdbwd-causal.json"
  $b --modes paper head_groups seed --head-dim 128 --backward --seq-lens 1048576 --dense-max-n 1 --json "$out/kern-fwdbwd-d128.json"
fi
