#!/bin/bash
# GPU session 2026-12-02 (sixth), call 3: plain generate() with eager caches, profiled per step
# (call 2: zipkv 69 ms a step at 1 x 32K against DynamicCache's 21.5); generate()'s compiled step
# with dynamo's module guards skipped (call 2: the guard check ~0.9 ms of host time a step, while
# the GPU waits) against StaticDecoder's compiled graph step in the same run.
set -u
timeout 200 python3 -m experiments.eager_generate_step --out $OUT/eager_generate_step_h200_c3.json --shapes 1x32768,8x8192 \
  --methods dynamic,snapkv,zipkv --profile dynamic,snapkv,zipkv 2>&1 | grep -vE "profiler_st|^USDT|Warn|warn"
timeout 330 python3 -m experiments.profile_generate --out $OUT/profile_generate_h200_c3.json --layers 32 \
  --batch 8 --context 4096 --new 48 --methods zipkv,zipkv+nnguards,full+nnguards --graph 2>&1 | grep -vE "profiler_st|^USDT|Warn|warn" | tail -6
