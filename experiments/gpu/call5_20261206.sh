#!/bin/bash
# GPU session 2026-12-02 (sixth), call 5: cProfile of eager decode steps (8 of the 32 layers,
# 8 x 8K): the Python functions behind zipkv's 3.1x and SnapKV's 2.2x DynamicCache's step.
set -u
timeout 200 python3 -m experiments.cprofile_eager_decode --out $OUT --layers 8 --batch 8 --context 8192 \
  --methods dynamic,zipkv,snapkv 2>&1 | grep -vE "Warn|warn"
for m in zipkv snapkv; do head -60 $OUT/cprofile_eager_decode_$m.txt | tail -45; done
