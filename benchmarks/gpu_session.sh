#!/usr/bin/env bash
# One GPU session in one go (issue 13, item 8): the machine, the CUDA tests, CPU against CUDA on
# the small nets and on a real-size model, where the time goes on CUDA (profile_sweep.py), each
# step under its own time limit, everything written to one folder ($OUT on the lent machine,
# else benchmarks/gpu-results/) with a summary table in summary.md. Run it from the repository
# root on a machine with a usable CUDA GPU:
#
#   bash benchmarks/gpu_session.sh                 # 8-12 minutes on an H200 with 16 cores
#   STEP_LIMIT=120 bash benchmarks/gpu_session.sh  # shorter limits per step
#
# Nothing here installs anything: onnxruntime-gpu (CUDA 13, cuDNN 9) must import with its
# CUDAExecutionProvider; the first step records whether it does, and the others are skipped
# (with that reason in the summary) when it does not.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu-results}
mkdir -p "$out"
limit=${STEP_LIMIT:-240}
summary="$out/summary.md"

step() {  # step NAME COMMAND...: run with a time limit, output to NAME.txt, one summary line
    local name=$1
    shift
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    local how="exit $rc"
    [ "$rc" -eq 124 ] && how="timed out after ${limit} s"
    echo "| $name | $how | $((SECONDS - start)) s | \`$*\` |" >>"$summary"
    return "$rc"
}

{
    echo "# GPU session $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    echo "CPU cores: $(nproc)"
    python - <<'EOF' 2>&1
import numpy, onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_available_providers(), "numpy", numpy.__version__)
from onnx_pathwise import runtime
print("onnx_pathwise sees CUDA:", runtime.cuda_available())
EOF
    echo '```'
    echo
    echo "| step | result | time | command |"
    echo "| --- | --- | --- | --- |"
} >"$summary"

if ! python -c "from onnx_pathwise import runtime; raise SystemExit(0 if runtime.cuda_available() else 1)" 2>/dev/null; then
    echo "| all | skipped: onnxruntime cannot use a CUDA GPU here | 0 s | |" >>"$summary"
    cat "$summary"
    exit 1
fi

# most wanted first: the machine may go back before the last step
step test_cuda python -m pytest -q -p no:cacheprovider tests/test_cuda.py
step realsize_resnet50_k10 python benchmarks/realsize.py --models resnet50 --classes 10 --batch 8 \
    --what devices --repeat 2
step realsize_resnet50 python benchmarks/realsize.py --models resnet50 --classes 1000 --batch 1 \
    --what devices --repeat 0
step profile_resnet50 python benchmarks/profile_sweep.py --model resnet50 --classes 1000 --device cuda \
    --warm 1
step bench_devices python benchmarks/bench_devices.py --repeat 3
step realsize_resnet50_b8 python benchmarks/realsize.py --models resnet50 --classes 1000 --batch 8 \
    --what devices --repeat 0

{
    echo
    echo "## CPU against CUDA"
    echo '```'
    tail -n 12 "$out/bench_devices.txt"
    for f in realsize_resnet50_k10 realsize_resnet50 realsize_resnet50_b8; do
        grep '^devices' "$out/$f.txt" 2>/dev/null || tail -n 3 "$out/$f.txt" 2>/dev/null
    done
    echo '```'
    echo
    echo "## Where the time goes on CUDA (ResNet-50, K = 1,000, batch 1)"
    echo '```'
    head -n 40 "$out/profile_resnet50.txt" 2>/dev/null
    echo '```'
} >>"$summary"
cat "$summary"
