#!/bin/bash
# GPU session 2026-12-02 (sixth), call 1: the gpu suite on this tree (the chunked key quantizer,
# the sync-free tier indexes, both first run here), the host work of each prefill on CUDA, the
# prefill stage, the folded-heads decode attention of the evicting layers. $OUT from the device tool.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 210 python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 14 --timeout 150 > $OUT/gpu_tests_h200_20261206.log 2>&1
grep -E "passed|failed" $OUT/gpu_tests_h200_20261206.log | tail -1
grep -E "^FAILED" $OUT/gpu_tests_h200_20261206.log | head -10
timeout 40 python3 -m experiments.sdpa_folded_decode --out $OUT/sdpa_folded_decode_h200.json 2>&1 | tail -8
timeout 60 python3 -m experiments.count_prefill_ops --device cuda --length 8192 --layers 2 \
  --methods zipkv,snapkv,h2o,zipvl --top 12 --out $OUT/count_prefill_ops_8k_20261206.json 2>&1 | grep -E "extra ops|rror"
timeout 180 python3 -m benchmarks.headline --out $OUT --tag c1_prefill --stage prefill \
  --prefill-methods dynamic,zipkv,snapkv,h2o,zipvl --deadline-s 170 --total-s 175 2>&1 | grep -E "^prefill|wrote|rror" | head -12
