#!/bin/bash
# Issue 17: `zipkv eval` once per method given, one after the other, each appending to the same
# folder; float32 on one thread, niced (this AVX2-only CPU runs float32 5.4x faster than
# bfloat16: a 256-token forward 15 s vs 83 s). A line per method (exit status, seconds) in $LOG.
#   bash experiments/eval/queue.sh METHOD...                  # the 1.5B, six tasks at 1K, one case each
#   MODEL=qwen2.5-coder-0.5b OUT=results/eval-qwen2.5-coder-0.5b-fp32 bash experiments/eval/queue.sh METHOD...
#   TASKS="lm_paul_graham lm_shakespeare" COUNT=4 bash experiments/eval/queue.sh METHOD...   # more LM cases
set -u
MODEL=${MODEL:-qwen2.5-coder-1.5b}
OUT=${OUT:-results/eval-$MODEL-fp32}
TASKS=${TASKS:-passkey niah_single_essay niah_multikey_essay niah_multivalue lm_paul_graham lm_shakespeare}
COUNT=${COUNT:-1}
LOG=${LOG:-/tmp/eval_queue.log}
for m in "$@"; do
  s=$(date +%s)
  nice -n 10 zipkv eval --model "$MODEL" --lengths 1024 --count "$COUNT" --threads 1 --dtype float32 --no-plots \
    --tasks $TASKS --out "$OUT" --methods "$m" > "/tmp/eval_$(basename "$OUT")_$(echo "$m" | tr ':,=' '___').log" 2>&1
  echo "$m rc=$? $(( $(date +%s) - s )) s" >> "$LOG"
done
