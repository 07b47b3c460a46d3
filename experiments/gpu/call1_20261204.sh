#!/bin/bash
# GPU session 2026-12-02 (fourth), call 1: the prefill-mass tests (one-pass path new), the mass
# kernel's tile sweep beside the prompt attention, where each method's prefill goes (profile at
# 8K and 32K, 4 layers), and the prefill stage for dynamic + h2o. $OUT from the device tool.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
timeout 120 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu_prefill_mass.py tests/test_gpu_kernels.py \
  -k "prefill_mass or lse" --timeout 100 > $OUT/gpu_tests_mass.log 2>&1
grep -E "passed|failed|prefill mass" $OUT/gpu_tests_mass.log | tail -3; grep -E "^FAILED" $OUT/gpu_tests_mass.log | head
timeout 120 python3 -m experiments.prefill_mass_sweep --out $OUT/prefill_mass_sweep.json 2>&1 | grep -v "^USDT" | tail -25
timeout 150 python3 -m experiments.profile_prefill --out $OUT/profile_prefill_8k.json --length 8192 --layers 4 \
  --methods dynamic,snapkv,h2o,zipvl,zipkv 2>&1 | grep -v "USDT\|STAGE" | head -90
timeout 120 python3 -m experiments.profile_prefill --out $OUT/profile_prefill_32k.json --length 32768 --layers 4 \
  --methods dynamic,h2o,zipvl,snapkv --top 10 2>&1 | grep -v "USDT\|STAGE" | head -50
timeout 150 python3 -m benchmarks.headline --out $OUT --tag c1_prefill --stage prefill \
  --prefill-methods dynamic,h2o --deadline-s 140 --total-s 145 2>&1 | grep -E "^prefill|wrote|rror" | head -10
