#!/usr/bin/env bash
# The GPU check, in one command, for a machine with an NVIDIA H100/H200, its own python3 with a
# CUDA build of torch, nvcc, and no network:
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# 1. builds the extension (pip install --no-build-isolation --no-deps -e ., offline),
# 2. runs tests/test_kernels.py with the extension required (the CUDA tests included),
# 3. runs the GPU benchmark (targets first, later configurations dropped past a time limit),
# 4. prints a short summary last.
# Sized to finish in under 8 minutes on 16 cores. OUT_DIR receives gpu.txt, build.log,
# tests.log, bench.txt, bench_gpu.json and summary.txt.
set -uo pipefail

out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nvcc --version | tail -2;
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee "$out/gpu.txt"

step "build (log: build.log)"
# Build with the system compiler when there is one: a toolchain that links libstdc++ statically
# (the GPU image's /opt/gcc wrapper does) gives the extension its own C++ runtime, and C++ errors
# raised in the ops then crash the process instead of reaching Python (docs/kernels.md).
if [ -x /usr/bin/g++ ] && [ -z "${CXX:-}" ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
build_start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
  > "$out/build.log" 2>&1
build_status=$?
build_seconds=$(( $(date +%s) - build_start ))
if [ $build_status -ne 0 ]; then
  tail -40 "$out/build.log"
  echo "SUMMARY: build FAILED after ${build_seconds}s (see build.log)" | tee "$out/summary.txt"
  exit 1
fi
grep "\[gpoe_fusion build\]" "$out/build.log"

step "tests (log: tests.log)"
GPOE_FUSION_REQUIRE_EXTENSION=1 timeout 240 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -m "cuda or not slow" -rfEs > "$out/tests.log" 2>&1
test_status=$?
tail -15 "$out/tests.log"

step "benchmark (table: bench.txt)"
timeout 330 "$py" benchmarks/bench_fusion.py --devices cuda --time-limit "${BENCH_TIME_LIMIT:-200}" --json "$out/bench_gpu.json" \
  > "$out/bench.txt" 2>&1
bench_status=$?
tail -30 "$out/bench.txt"

step "summary"
"$py" - "$out" "$build_seconds" "$test_status" "$bench_status" <<'EOF' | tee "$out/summary.txt"
import json, sys
from pathlib import Path

out, build_seconds, test_status, bench_status = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
gpu = (out / "gpu.txt").read_text().splitlines()[0]
tests = (out / "tests.log").read_text().strip().splitlines()
counts = tests[-1] if tests else "no test output"
print(f"SUMMARY on {gpu}")
print(f"  build: ok in {build_seconds}s")
print(f"  tests: {'ok' if test_status == 0 else 'FAILED'}: {counts}")
bench = out / "bench_gpu.json"
if bench_status != 0 or not bench.exists():
    print(f"  benchmark: FAILED (exit {bench_status}, see bench.txt)")
    sys.exit(1)
data = json.loads(bench.read_text())
env = data["environment"]
print(f"  copy bandwidth {env['copy_gbps']['cuda']:.0f} GB/s; {len(data['rows'])} rows"
      + (" (time limit hit)" if env.get("truncated") else ""))
for row in data["rows"]:
    if (row["m"], row["batch"], row["d"]) != (4, 65536, 1024):
        continue
    ms = row["ms"]
    print(f"  {row['dtype']:8} {row['pass_name']:16} kernel {ms['kernel']:7.3f} ms  "
          f"{100 * row['fraction_of_copy']:4.0f}% of copy  x{row['speedup']['eager']:.2f} eager  "
          f"x{row['speedup']['compile']:.2f} compile")
print("  targets: forward and backward >= 85% of copy; forward+backward >= 1.3x compile")
sys.exit(0 if test_status == 0 else 1)
EOF
summary_status=$?
step "done"
exit $summary_status
