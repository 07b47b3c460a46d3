#!/bin/bash
# GPU session 2026-12-02 (third), call 1: the gpu suite (new: prefill_mass, write_slots kernels),
# the evictors not yet measured compiled at 8 x 32K, and the prefill stage after the causal-flash
# and prefill-mass changes. $OUT from the device tool.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 14 --timeout 200 > $OUT/gpu_tests.log 2>&1
grep -E "passed|failed" $OUT/gpu_tests.log | tail -2; grep -E "^FAILED" $OUT/gpu_tests.log | head -12
grep -E "prefill_mass.*ms|kernel .* ms" $OUT/gpu_tests.log | head -4
timeout 190 python3 -m benchmarks.headline --out $OUT --tag c1_prefill --stage prefill \
  --prefill-methods dynamic,zipkv,snapkv,h2o,zipvl,dynamic@4K,zipkv@4K --deadline-s 180 --total-s 185 2>&1 \
  | grep -E "^prefill|wrote|rror" | head -20
timeout 190 python3 -m benchmarks.registry_decode --out $OUT --tag c1_registry_compiled --compile --runs 3 --steps 20 \
  --methods streaming_llm,h2o,pyramidkv 2>&1 | grep -E '^\{' | cut -c1-300
