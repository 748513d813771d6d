#!/usr/bin/env bash
# The GPU checks, in one call of a lent GPU machine (or any machine with a CUDA torch):
# versions, the CUDA build, every backend test on CUDA tensors (compiled Triton, not the
# interpreter), bench/report_gpu.py (and its --profile) and `shira-kernels bench --device cuda`.
# STEPS picks and orders them (default: info tests report bench; also: profile, and multi:
# bench/report_multi_adapter.py --device cuda, issue 19's batch of many adapters). Everything
# lands in $OUT (default gpu-out/): log.txt, gpu_report.md/.json, main_gpu.tar.gz,
# multi_adapter_gpu.md.
# Uses the machine's own python3 and its torch/triton/peft; the package runs from the tree.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 MAX_JOBS="${MAX_JOBS:-16}"
export SHIRA_KERNELS_CACHE="${SHIRA_KERNELS_CACHE:-/tmp/shira_kernels_cache}"
STEPS="${STEPS:-info tests report bench}"
exec > >(tee -a "$OUT/log.txt") 2>&1
step() { echo; echo "=== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
for s in $STEPS; do case $s in
  info)
    step "shira-kernels info (builds the cpu and cuda extensions)"
    timeout 400 python3 -m shira_kernels info --no-timing ;;
  tests)
    step "tests on CUDA tensors"
    # -k cuda: the cuda-<backend> cases of every backend test, test_cuda_gpu.py, the nvcc checks.
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests -k cuda -q -p no:cacheprovider \
      -n "${WORKERS:-8}" --timeout 240 -rfE --tb=short ${PYTEST_ARGS:-} ;;
  profile)
    step "bench/report_gpu.py --profile"
    timeout "${PROFILE_TIMEOUT:-150}" python3 bench/report_gpu.py --profile ;;
  report)
    step "bench/report_gpu.py"
    timeout "${REPORT_TIMEOUT:-300}" python3 bench/report_gpu.py --out "$OUT/gpu_report.md" ${REPORT_ARGS:-} ;;
  multi)
    step "bench/report_multi_adapter.py --device cuda"
    timeout "${MULTI_TIMEOUT:-300}" python3 bench/report_multi_adapter.py --device cuda \
      --out "$OUT/multi_adapter_gpu.md" ${MULTI_ARGS:-} ;;
  bench)
    step "shira-kernels bench --device cuda"
    timeout "${BENCH_TIMEOUT:-300}" python3 -m shira_kernels bench --device cuda --no-progress \
      --out /tmp/main_gpu ${BENCH_ARGS:-}
    tar -czf "$OUT/main_gpu.tar.gz" -C /tmp main_gpu ;;
esac; done
step "done"
