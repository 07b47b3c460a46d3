#!/bin/bash
# GPU session 2026-12-02 (second), call 1: the gpu suite rerun, then the per-layer compiled step
# against the uncompiled one at 8 x 32K (headline rows) on the lent H200. $OUT from the device tool.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 14 --timeout 200 > $OUT/gpu_tests.log 2>&1
grep -E "passed|failed" $OUT/gpu_tests.log | tail -3; grep -E "^FAILED" $OUT/gpu_tests.log | head -20
timeout 110 python3 -m benchmarks.headline --out $OUT --tag c1_plain --shapes 8x32K --rows bf16,zipkv \
  --deadline-s 100 --total-s 105 2>&1 | grep -v Warning | tail -4
timeout 230 python3 -m benchmarks.headline --out $OUT --tag c1_compiled --compile --shapes 8x32K --rows bf16,zipkv,fp8 \
  --deadline-s 220 --total-s 225 2>&1 | grep -v Warning | tail -6
