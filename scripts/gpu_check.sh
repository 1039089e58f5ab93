#!/usr/bin/env bash
# The GPU checks, in one run on a machine with an NVIDIA GPU, CuPy, numba-cuda, torch and JAX:
#   1. tests/test_cuda.py on the GPU (BNNET_TEST_GPU=1: the kernels run on the device, not the simulator);
#   2. benchmarks/gpu.py: BatchNorm forward + backward against PyTorch and JAX, with the targets.
# Results go to $OUT (the device tool's output folder) or benchmarks/results/.
#
# bnnet's own pure dependencies may be missing from a GPU image that cannot reach a package index:
# beforehand, on a machine that can, `pip download --no-deps -d wheels safetensors tqdm` (both wheels
# run on any Python 3.8+ on x86_64 Linux) and bring the wheels/ folder along.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python -c "import safetensors, tqdm" 2>/dev/null || pip install -q --no-index --find-links wheels safetensors tqdm
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu_machine.txt" 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BNNET_TEST_GPU=1 timeout 300 python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -40 > "$out/gpu_tests.txt"
tail -3 "$out/gpu_tests.txt"
timeout 420 python benchmarks/gpu.py "$@" --out "$out"
# bnnet train on the bundled data: the GPU against the CPU (accuracy and training time)
for device in cpu cuda; do
    timeout 300 python -m bnnet train --device "$device" --quiet --out "$out/train_$device" 2>&1 | tail -2
done
python - "$out" <<'PY'
import json, sys
for device in ("cpu", "cuda"):
    s = json.load(open(f"{sys.argv[1]}/train_{device}/summary.json"))
    print(device, "test accuracy", round(s["test_accuracy"], 4), "train seconds", round(s["train_seconds"], 1))
PY
