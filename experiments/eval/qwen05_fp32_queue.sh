#!/bin/bash
# Issue 17, session 2026-12-02 (fifth): the 0.5B suite in float32 (5.4x faster than bfloat16 on
# this AVX2-only CPU: a 256-token forward 15 s vs 83 s, one thread), six tasks of the default
# suite at 1K, one case each, one method per invocation (each appends to the same folder).
set -u
OUT=results/eval-qwen2.5-coder-0.5b-fp32
C="--model qwen2.5-coder-0.5b --lengths 1024 --count 1 --threads 1 --dtype float32 --no-plots
   --tasks passkey niah_single_essay niah_multikey_essay niah_multivalue lm_paul_graham lm_shakespeare --out $OUT"
for m in "$@"; do
  s=$(date +%s)
  nice -n 10 zipkv eval $C --methods "$m" > /tmp/eval05_$(echo "$m" | tr ':,=' '___').log 2>&1
  echo "$m rc=$? $(( $(date +%s) - s )) s" >> /tmp/eval05_queue.log
done
