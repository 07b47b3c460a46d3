#!/bin/bash
# GPU session 2026-12-02 (fifth), call 1: the gpu suite on this tree (new: the chunked key
# quantizer, the sync-free tier indexes), the host work of each prefill on CUDA (ops and reads a
# layer), the prefill stage, a per-method prefill profile at 8K. $OUT from the device tool.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 14 --timeout 150 > $OUT/gpu_tests_h200_20261205.log 2>&1
grep -E "passed|failed" $OUT/gpu_tests_h200_20261205.log | tail -1
grep -E "^FAILED" $OUT/gpu_tests_h200_20261205.log | head -10
timeout 60 python3 -m experiments.count_prefill_ops --device cuda --length 8192 --layers 2 \
  --methods zipkv,snapkv,h2o,zipvl --top 12 --out $OUT/count_prefill_ops_8k_20261205.json 2>&1 | grep -E "extra ops|rror"
timeout 170 python3 -m benchmarks.headline --out $OUT --tag c1_prefill --stage prefill \
  --prefill-methods dynamic,zipkv,snapkv,h2o,zipvl --deadline-s 160 --total-s 165 2>&1 | grep -E "^prefill|wrote|rror" | head -12
timeout 90 python3 -m experiments.profile_prefill --out $OUT/profile_prefill_8k_20261205.json --length 8192 --layers 4 \
  --methods dynamic,zipkv,zipvl 2>&1 | tail -4
