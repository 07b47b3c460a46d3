#!/bin/bash
# GPU session 2026-12-02 (sixth), call 4: plain generate() with eager caches at 8 x 8K profiled per
# step (call 3: zipkv 90.8 ms, snapkv 66.6 ms, DynamicCache 29.0 ms a step there; at 1 x 32K
# 58.6 / 47.4 / 31.1): which kernels and host ops grow with the batch.
set -u
timeout 240 python3 -m experiments.eager_generate_step --out $OUT/eager_generate_step_8x8k_h200_c4.json --shapes 8x8192 \
  --methods dynamic,snapkv,zipkv,h2o --profile dynamic,snapkv,zipkv 2>&1 | grep -vE "profiler_st|^USDT|Warn|warn"
