"""One decode-attention configuration, run a few times, for Nsight Compute:

ncu --clock-control none -k regex:_decode_kernel --launch-skip 2 -c 1 --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --section LaunchStats python3 -m experiments.profile_decode
"""

import json
import os

import torch

from benchmarks import bench_decode as bd
from zipkv.kernels.decode_attention import decode_attention

recipe = os.environ.get("RECIPE", "zipcache42")
tuning = json.loads(os.environ.get("TUNING", "{}"))
b, n = int(os.environ.get("BATCH", "8")), int(os.environ.get("CONTEXT", "32768"))
segs, kf, vf = bd.make_cache(recipe, b, 8, n, 128)
q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.float16)
for _ in range(4):
    decode_attention(q, segs, kf, vf, impl="triton", **tuning)
torch.cuda.synchronize()
print("ok", recipe, tuning)
