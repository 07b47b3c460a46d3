#!/bin/bash
# GPU session 2026-12-02 (fourth), call 2: after call 1's profile. The mask built only when read,
# fewer device reads per layer, the mass kernel's unmasked below-diagonal loop (3 stages), the
# h2o decode bookkeeping on tensor cores. Tests with their printed timings, the tile sweep again,
# the prefill stage for every selection method, h2o compiled at 8 x 32K. $OUT from the device tool.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
timeout 150 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu_prefill_mass.py tests/test_gpu_attention_mass.py \
  tests/test_static_evicting.py tests/test_gpu_kernels.py -k "prefill_mass or lse or mass or h2o or evict" --timeout 140 \
  > $OUT/gpu_tests_c2.log 2>&1
grep -E "passed|failed|prefill mass|bookkeeping" $OUT/gpu_tests_c2.log | tail -4; grep -E "^FAILED" $OUT/gpu_tests_c2.log | head
timeout 100 python3 -m experiments.prefill_mass_sweep --out $OUT/prefill_mass_sweep2.json 2>&1 | grep -v "^USDT" | grep "^{\|one_pass" | cut -c1-160
timeout 200 python3 -m benchmarks.headline --out $OUT --tag c2_prefill --stage prefill \
  --prefill-methods dynamic,zipkv,snapkv,h2o,zipvl --deadline-s 190 --total-s 195 2>&1 | grep -E "^prefill|wrote|rror" | head -12
timeout 150 python3 -m benchmarks.registry_decode --out $OUT --tag c2_registry_compiled --compile --runs 3 --steps 20 \
  --methods h2o 2>&1 | grep -E '^\{' | cut -c1-300
ls $OUT
