#!/bin/bash
# Issue 17, session 2026-12-02 (fifth): the two language-modelling tasks of the 1.5B suite with
# four cases each instead of one (their top-1 agreement over 64 teacher-forced tokens moves in
# steps of 1/64, and they decide the suite: the retrieval tasks saturate). Appends to the same
# folder as qwen15_fp32_queue.sh; case 0 of each task is already there and is not run again.
set -u
OUT=results/eval-qwen2.5-coder-1.5b-fp32
C="--model qwen2.5-coder-1.5b --lengths 1024 --count 4 --threads 1 --dtype float32 --no-plots
   --tasks lm_paul_graham lm_shakespeare --out $OUT"
for m in "$@"; do
  s=$(date +%s)
  nice -n 10 zipkv eval $C --methods "$m" > /tmp/eval_lm4_$(echo "$m" | tr ':,=' '___').log 2>&1
  echo "$m rc=$? $(( $(date +%s) - s )) s" >> /tmp/eval_queue.log
done
