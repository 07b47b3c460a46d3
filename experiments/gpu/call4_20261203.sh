#!/bin/bash
# GPU session 2026-12-02 (third), call 4: the capacity stage with the cap enforced (call 3 named
# the device without its index) and the measured largest batch (search from the prediction).
set -u
timeout 420 python3 -m benchmarks.headline --out $OUT --tag c4_capacity --stage capacity \
  --deadline-s 400 --total-s 410 2>&1 | grep -E "capacity|wrote|Error" | head -40
ls $OUT
