#!/bin/bash
# GPU session 2026-12-02 (third), call 2: generate() against the graph decoder (compiled_check),
# the capacity stage, and the evictors still unmeasured compiled at 8 x 32K.
set -u
timeout 230 python3 -m benchmarks.compiled_check --out $OUT --batch 8 --context 4096 --new 64 \
  --methods zipkv,kivi,snapkv 2>&1 | grep -E '^\{|rror' | cut -c1-400
timeout 120 python3 -m benchmarks.headline --out $OUT --tag c2_capacity --stage capacity \
  --deadline-s 110 --total-s 115 2>&1 | grep -E "capacity|wrote|rror" | head -20
timeout 200 python3 -m benchmarks.registry_decode --out $OUT --tag c2_registry_compiled --compile --runs 3 --steps 20 \
  --methods cake,defensive_kv,key_norm 2>&1 | grep -E '^\{' | cut -c1-300
ls $OUT
