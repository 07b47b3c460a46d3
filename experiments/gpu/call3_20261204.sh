#!/bin/bash
# GPU session 2026-12-02 (fourth), call 3: h2o's static step from the attention's own scores
# (decode kernel writes scale * q.k; the bookkeeping reads 16 bytes a slot), its GPU tests with
# the printed timing, the whole gpu suite, h2o compiled at 8 x 32K, and the prefill stage once
# more (zipkv's NaN check one read a layer; eager blocks through the fused quantize kernels).
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
timeout 100 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu_attention_mass.py --timeout 90 \
  > $OUT/gpu_tests_mass_c3.log 2>&1
grep -E "passed|failed|bookkeeping" $OUT/gpu_tests_mass_c3.log | tail -3; grep -E "^FAILED" $OUT/gpu_tests_mass_c3.log | head
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 14 --timeout 200 > $OUT/gpu_tests.log 2>&1
grep -E "passed|failed" $OUT/gpu_tests.log | tail -2; grep -E "^FAILED" $OUT/gpu_tests.log | head -12
timeout 150 python3 -m benchmarks.registry_decode --out $OUT --tag c3_registry_compiled --compile --runs 3 --steps 20 \
  --methods h2o 2>&1 | grep -E '^\{' | cut -c1-300
timeout 150 python3 -m benchmarks.headline --out $OUT --tag c3_prefill --stage prefill \
  --prefill-methods dynamic,zipkv,snapkv,h2o,zipvl --deadline-s 140 --total-s 145 2>&1 | grep -E "^prefill|wrote|rror" | head -12
ls $OUT
