#!/usr/bin/env bash
# On a machine with several GPUs: ring correctness against single-GPU DilatedAttention (bf16),
# weak scaling (n/P fixed at 256K), strong scaling at n = 512K. Usage: bash benchmarks/gpu_multi.sh OUTDIR
set -uo pipefail
out=${1:-bench-results}; mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
P=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $P; NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-unset}"
python3 benchmarks/multi_gpu_check.py --world "$P" --seq-len 32768 2>&1 | grep -v Warning | tail -20
r="python3 benchmarks/ring.py --device cuda --heads 12 --segment-lengths 2048 4096 8192 16384 32768 --reps 5"
$r --worlds 1 --seq-len 262144 --json "$out/weak-1.json" 2>&1 | grep -v -i warn | tail -2
$r --worlds "$P" --seq-len $((262144 * P)) --json "$out/weak-$P.json" 2>&1 | grep -v -i warn | tail -2
$r --worlds 1 "$P" --seq-len 524288 --json "$out/strong.json" 2>&1 | grep -v -i warn | tail -3
