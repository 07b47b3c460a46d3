#!/bin/bash
# GPU session 2026-12-02 (sixth), call 6: the packed decode kernel launched through
# zipkv/kernels/cuda_launch.py (one ctypes value per argument, one array constructor) instead of
# torch's _CudaKernel.__call__ (0.41 ms a call under cProfile in call 5): the kernel's gpu tests,
# then the eager step's cProfile and plain generate() again. Prediction: the launcher ~0.4 ->
# ~0.15 ms a call under the profiler; zipkv's eager step ~5-8 ms faster at 32 layers.
set -u
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_mma.py tests/test_cuda_launch.py \
  tests/test_gpu_decode.py -n 8 --timeout 150 2>&1 | tail -3
timeout 120 python3 -m experiments.cprofile_eager_decode --out $OUT --layers 8 --batch 8 --context 8192 \
  --methods dynamic,zipkv 2>&1 | grep -vE "Warn|warn"
grep -E "cuda_launch|_utils.py|mma_decode.py|decode_attention.py:175" $OUT/cprofile_eager_decode_zipkv.txt | head -8
timeout 150 python3 -m experiments.eager_generate_step --out $OUT/eager_generate_step_h200_c6.json --shapes 1x32768,8x8192 \
  --methods dynamic,zipkv 2>&1 | grep -vE "Warn|warn"
