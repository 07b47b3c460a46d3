#!/bin/bash
# GPU session 2026-12-02 (fourth), call 4: the fused key quantizer only where it has >= 2 programs
# per SM (call 3: zipkv's 32K prefill 1.11x with it, 1.08x before), the quantize GPU tests, the
# prefill stage once more. $OUT from the device tool.
set -u
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_kernels.py -k quantize --timeout 50 \
  > $OUT/gpu_tests_quant_c4.log 2>&1
grep -E "passed|failed" $OUT/gpu_tests_quant_c4.log | tail -1
timeout 150 python3 -m benchmarks.headline --out $OUT --tag c4_prefill --stage prefill \
  --prefill-methods dynamic,zipkv,snapkv,h2o,zipvl --deadline-s 140 --total-s 145 2>&1 | grep -E "^prefill|wrote|rror" | head -12
