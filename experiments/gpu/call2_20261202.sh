#!/bin/bash
# GPU session 2026-12-02 (second), call 2: the two gpu cases that failed in call 1 (fixed), then
# the compiled headline rows (bf16 / fp8 / zipkv, each decoder layer compiled) at the target shapes.
set -u
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_kernels.py tests/test_bench_headline.py -n 8 \
  -k "quantize_pack_matches or every_row_runs_on_cuda" > $OUT/gpu_tests_rerun.log 2>&1; tail -2 $OUT/gpu_tests_rerun.log
timeout 520 python3 -m benchmarks.headline --out $OUT --tag c2_compiled --compile --shapes 8x32K,16x32K,4x128K \
  --rows zipkv,bf16,fp8 --deadline-s 180 --total-s 510 2>&1 | grep -v Warning | grep -E "ms/step|error|Error|wrote" | head -20
