#!/bin/bash
# GPU session 2026-12-02 (sixth), call 2: where generate()'s decode step goes (host: zipkv's
# pre-hook, the compiled call, transformers' rest; GPU: interval and busy time), 32 layers at
# 8 x 4K as compiled_check measured it (1.46x the compiled graph step); a prefill profile at 8K;
# the eager decode attention of the evicting layers with enable_gqa (call 1 timed the folded form)
# and plain generate() with eager caches.
set -u
timeout 60 python3 -m experiments.sdpa_folded_decode --out $OUT/sdpa_gqa_decode_h200.json --shapes 1x32768,8x32768 2>&1 | tail -4
timeout 120 python3 -m experiments.eager_generate_step --out $OUT/eager_generate_step_h200.json --shapes 1x32768,8x8192 \
  --methods dynamic,snapkv,zipkv 2>&1 | tail -6
timeout 120 python3 -m experiments.profile_prefill --out $OUT/profile_prefill_8k_20261206.json --length 8192 --layers 4 \
  --methods dynamic,zipkv,zipvl 2>&1 | tail -4
timeout 340 python3 -m experiments.profile_generate --out $OUT/profile_generate_h200_20261206.json --layers 32 \
  --batch 8 --context 4096 --new 48 --methods zipkv,full 2>&1 | grep -vE "profiler_st|^USDT" | tail -6
