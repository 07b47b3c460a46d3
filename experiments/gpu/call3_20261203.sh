#!/bin/bash
# GPU session 2026-12-02 (third), call 3: the capacity stage again (call 2's check raised in
# set_per_process_memory_fraction; now recorded and checked against the peak), and generate()
# against the graph decoder on all 32 layers (call 2's 4-layer check: 1.9-2.0x, host overhead).
set -u
timeout 150 python3 -m benchmarks.headline --out $OUT --tag c3_capacity --stage capacity \
  --deadline-s 140 --total-s 145 2>&1 | grep -E "capacity|wrote|Error" | head -24
timeout 330 python3 -m benchmarks.compiled_check --out $OUT --layers 32 --batch 8 --context 4096 --new 64 \
  --methods zipkv,snapkv 2>&1 | grep -E '^\{|Error' | cut -c1-500
ls $OUT
