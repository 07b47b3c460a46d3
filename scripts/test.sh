#!/usr/bin/env bash
# Run the test suite (what CI runs): everything on the newest supported transformers (5.24), then
# the core, evicting and compatibility tests again on the oldest supported one (5.2.0), in
# .venv-oldest (built once, reused while pyproject.toml is unchanged). Two pytest workers of one
# thread each (ZIPKV_TEST_WORKERS): on a 2-core box the suite ran 394 s against 627 s in one
# process of 2 threads (most of it is single-threaded Python and Triton's interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
WORKERS="${ZIPKV_TEST_WORKERS:-2}"
export TRITON_INTERPRET=1 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q -p no:cacheprovider -n "$WORKERS" tests
OLDEST_TRANSFORMERS=5.2.0
if [ "${ZIPKV_SKIP_OLDEST:-0}" != 1 ]; then
  deactivate
  # Reuse .venv-oldest (1.2 GB) when it was built from this pyproject.toml (its dependencies)
  # for this checkout and holds the right transformers; build it otherwise (CI starts from a
  # clean checkout, so it builds it once). zipkv is installed editable: the checkout's code is
  # what runs either way. ZIPKV_REBUILD_OLDEST=1 forces a rebuild.
  stamp="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD $OLDEST_TRANSFORMERS"
  if [ "${ZIPKV_REBUILD_OLDEST:-0}" = 1 ] || [ "$(cat .venv-oldest/zipkv-stamp 2>/dev/null)" != "$stamp" ] \
      || ! .venv-oldest/bin/python -c "import sys, transformers; sys.exit(transformers.__version__ != '$OLDEST_TRANSFORMERS')" 2>/dev/null; then
    rm -rf .venv-oldest
    python3 -m venv .venv-oldest
    . .venv-oldest/bin/activate
    python -m pip install -q torch==2.13.0
    python -m pip install -q -e ".[test]" "transformers==$OLDEST_TRANSFORMERS"
    echo "$stamp" > .venv-oldest/zipkv-stamp  # written last: an interrupted build is rebuilt
  else
    . .venv-oldest/bin/activate
  fi
  python -m pytest -q -p no:cacheprovider -n "$WORKERS" tests/test_cache.py tests/test_quant.py tests/test_eviction_cache.py tests/test_minicache.py \
    tests/test_transformers_compat.py tests/test_inputs.py tests/test_threads.py
fi
