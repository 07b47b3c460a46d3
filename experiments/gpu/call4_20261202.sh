#!/bin/bash
# GPU session 2026-12-02 (second), call 4: the slot-writing evictors compiled (write_slots op),
# the compiled int4 rows and fp8 at 4 x 128K, the two gpu cases of call 1 again.
set -u
timeout 250 python3 -m benchmarks.registry_decode --out $OUT --tag c4_registry_compiled --compile --runs 3 --steps 20 \
  --methods streaming_llm,h2o 2>&1 | grep -E '^\{' | cut -c1-420
timeout 170 python3 -m benchmarks.headline --out $OUT --tag c4_compiled --compile --shapes 8x32K,4x128K --rows int4,fp8 \
  --deadline-s 160 --total-s 165 2>&1 | grep -E "ms/step|wrote" | head
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_kernels.py tests/test_bench_headline.py -n 4 \
  -k "quantize_pack_matches or every_row_runs_on_cuda" > $OUT/gpu_tests_rerun.log 2>&1; tail -2 $OUT/gpu_tests_rerun.log
