"""Issue 21's memory scenario: sequential long prompts through the embedded model WITHOUT
torch.no_grad, a fresh cache per prompt, peak RSS after each (the cache of the previous prompt
must be gone: no reference cycles, no autograd graph held by it).

    python -m experiments.grad_prompt_loop --cache zipkv --prompts 20 --tokens 3500
    python -m experiments.grad_prompt_loop --cache dynamic --prompts 20 --tokens 3500
"""

import argparse
import json
import resource

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cache", default="zipkv", help="a registry method, or 'dynamic'")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--tokens", type=int, default=3500)
    args = p.parse_args()
    import zipkv
    from transformers import DynamicCache

    model, tok = zipkv.load_default_model()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(args.prompts):
        ids = torch.randint(100, 40000, (1, args.tokens), generator=g)
        cache = DynamicCache(config=model.config) if args.cache == "dynamic" else zipkv.make_cache(args.cache, model.config)
        out = model(ids, **zipkv.cache_kwargs(cache))  # grad enabled on purpose
        del out, cache
        rows.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # GiB (ru_maxrss is KiB)
        print(json.dumps({"prompt": i + 1, "peak_rss_gib": round(rows[-1], 3)}), flush=True)
    print(json.dumps({"cache": args.cache, "prompts": args.prompts, "tokens": args.tokens, "peak_rss_gib": rows}))


if __name__ == "__main__":
    main()
