#!/bin/bash
# Issue 17, session 2026-12-02 (fifth): a quick sweep of recipes at ~5x on the 1.5B's two
# language-modelling tasks (one case each, 64 teacher-forced tokens): their mean KL from the full
# cache's next-token distribution is a steadier signal than the suite's top-1 agreement, which
# moves in steps of 1/64. Lab rows (experiments/results/lm_sweep_15_fp32), not the suite.
set -u
OUT=experiments/results/lm_sweep_15_fp32
C="--model qwen2.5-coder-1.5b --lengths 1024 --count 1 --threads 1 --dtype float32 --no-plots
   --tasks lm_paul_graham lm_shakespeare --out $OUT"
for m in "$@"; do
  s=$(date +%s)
  nice -n 10 zipkv eval $C --methods "$m" > /tmp/lmsweep_$(echo "$m" | tr ':,=' '___').log 2>&1
  echo "$m rc=$? $(( $(date +%s) - s )) s" >> /tmp/lmsweep_queue.log
done
