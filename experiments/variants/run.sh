#!/bin/bash
# Kernel variants side by side on the lent GPU (session 7, experiments/NOTES.md v9): optional GPU
# tests ($TESTS) on the working kernel, then decode_v6 and/or the long-range precision check
# (prec.py) once per kernel source experiments/variants/$v.cu, copied over mma_decode.cu (and
# restored after). Make a variant with e.g.
#   git show 52005dd:zipkv/kernels/mma_decode.cu > experiments/variants/v8.cu
# Usage: VARIANTS="v8 cur" PREC="v8 cur" TUNE='{"d":{}}' bash experiments/variants/run.sh
export PYTHONUNBUFFERED=1
[ -z "$TUNE" ] && TUNE='{"d":{}}'
cp zipkv/kernels/mma_decode.cu /tmp/work.cu
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
if [ -n "$TESTS" ]; then timeout 200 python -m pytest -q -x $TESTS 2>&1 | tail -12; fi
for v in $VARIANTS; do
  cp experiments/variants/$v.cu zipkv/kernels/mma_decode.cu
  timeout 150 python -m experiments.decode_v6 --out $OUT --tag s7_$v --deadline-s 90 --recipes zipcache42 --methods ${METHODS:-zipcache,zipkv} --sdpa --variants "$TUNE" > $OUT/s7_$v.log 2>&1
  echo "== $v"; grep -E "^check|Traceback|Error" $OUT/s7_$v.log | cut -c1-200; sed -n "/summary/,\$p" $OUT/s7_$v.log
done
for v in $PREC; do
  cp experiments/variants/$v.cu zipkv/kernels/mma_decode.cu
  echo "== precision $v"; timeout 120 python experiments/variants/prec.py 2>&1 | tail -20
done
cp /tmp/work.cu zipkv/kernels/mma_decode.cu
