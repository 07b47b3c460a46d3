"""How similar adjacent layers' KV directions are on the embedded model (MiniCache's premise).

    python scripts/minicache_similarity.py --length 1024

MiniCache merges layers l and l+1 per token by SLERP of their key (value) directions, which
only preserves them when the two directions are close. This prints, for every adjacent layer
pair, the cosine between the two layers' directions (mean over tokens and KV heads) and the
mean angle, on one passkey prompt (keys after RoPE, as the cache sees them).
"""

from __future__ import annotations

import argparse
import math

import torch

import zipkv
from zipkv.eval.tasks.passkey import passkey
from zipkv.eviction_cache import record_prefill
from zipkv.merge import angular_distance, unit_directions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = zipkv.load_default_model(progress=False)
    case = passkey(tok, args.length, 0, 1, [0.5])[0]
    ids = tok(case.context, return_tensors="pt").input_ids
    records, _, _ = record_prefill(model, ids)
    print(f"{ids.shape[1]} tokens")
    print("| layers | keys: mean cos | keys: mean angle | values: mean cos | values: mean angle |")
    print("|---|---|---|---|---|")
    for layer in range(len(records) - 1):
        cells = []
        for name in ("keys", "values"):
            e_a = unit_directions(getattr(records[layer], name))[0]
            e_b = unit_directions(getattr(records[layer + 1], name))[0]
            angle = angular_distance(e_a, e_b)
            cells += [f"{angle.cos().mean():+.3f}", f"{math.degrees(angle.mean()):.0f} deg"]
        print(f"| {layer}-{layer + 1} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
