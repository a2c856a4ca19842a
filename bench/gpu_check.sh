#!/usr/bin/env bash
# GPU check for the fused kernels: run on a lent CUDA machine from the repository root (or anywhere). Installs
# nothing; uses the machine's python3 (torch + triton) with this checkout on PYTHONPATH. Logs and JSON go to $OUT
# when set (the device tool's output folder), else /tmp. The short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dest="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv 2>/dev/null || true
python3 bench/gpu_check.py --out "$dest/gpu_check.json" "$@" 2>&1 | tee "$dest/gpu_check.log"
exit "${PIPESTATUS[0]}"
