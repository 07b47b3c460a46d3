#!/usr/bin/env bash
# Run the test suite (what CI runs): everything on the newest supported transformers (5.24), then
# the core, evicting and compatibility tests again on the oldest supported one (5.2.0), in a
# throw-away venv.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export TRITON_INTERPRET=1 OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q -p no:cacheprovider tests
if [ "${ZIPKV_SKIP_OLDEST:-0}" != 1 ]; then
  rm -rf .venv-oldest
  deactivate
  python3 -m venv .venv-oldest
  . .venv-oldest/bin/activate
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[test]" "transformers==5.2.0"
  python -m pytest -q -p no:cacheprovider tests/test_cache.py tests/test_quant.py tests/test_eviction_cache.py tests/test_minicache.py \
    tests/test_transformers_compat.py tests/test_inputs.py tests/test_threads.py
fi
