#!/usr/bin/env bash
# The checks that need NVIDIA GPUs, in one go: tests/test_gpu.py (the engines
# with NCCL against the one-process reference, buddy replicas of device state,
# a GPU member's own cpu:gloo,cuda:nccl group) and shoal vs FSDP2/DDP on the
# GPUs (bench/zero_vs_fsdp.py --device cuda, world sizes up to the GPU count).
#
#     bash bench/gpu_checks.sh            # logs under runs/gpu-checks (or $OUT)
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-runs/gpu-checks}"
mkdir -p "$out"
python3 - <<'PY' | tee "$out/machine.txt"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {torch.cuda.nccl.version()}")
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}")
PY
python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log"
tests=$?
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
ws=1
[ "$gpus" -ge 2 ] && ws=1,2
[ "$gpus" -ge 4 ] && ws=1,2,4
python3 bench/zero_vs_fsdp.py --device cuda --world-sizes "$ws" --model gpt_small \
    --steps "${STEPS:-30}" --warmup "${WARMUP:-10}" --repeats "${REPEATS:-1}" 2>&1 |
    tee "$out/zero_vs_fsdp_cuda.txt"
bench=$?
exit $((tests || bench))
