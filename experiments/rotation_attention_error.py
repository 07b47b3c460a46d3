"""Attention-output error of rotated vs unrotated K/V quantization (issue 17, quick check).

Relative error ||o' - o|| / ||o|| of the last 32 queries' attention (causal, GQA) when the prompt's
keys / values are quantized, for: keys channelwise or tokenwise (one range per token over its
channels), values channel-separable tokenwise, each with and without the Hadamard rotation.
Inputs: random states with outlier channels (head dim 64 and 128), and the embedded model's own
post-RoPE K/V and queries on an essay prompt (every layer, mean over layers).

    python experiments/rotation_attention_error.py [--tokens 1024] [--no-model]
"""

import argparse
import json
import math

import torch

from zipkv.quant.rotation import HadamardRotation
from zipkv.quant.schemes import (
    dequantize_keys_channelwise,
    dequantize_values_tokenwise,
    quantize_keys_channelwise,
    quantize_values_tokenwise,
)


def keys_round_trip(k, bits, axis, group):
    n = k.shape[2]
    if axis == "channel":
        packed, scale, minimum, _ = quantize_keys_channelwise(k, bits, group)
        token_group = torch.arange(n) // (group or n)
        return dequantize_keys_channelwise(packed, scale, minimum, token_group.int(), bits)
    q = quantize_values_tokenwise(k, bits, None, False)
    return dequantize_values_tokenwise(*q, torch.zeros(n, dtype=torch.int32), bits)


def values_round_trip(v, bits):
    q = quantize_values_tokenwise(v, bits, None, True)
    return dequantize_values_tokenwise(*q, torch.zeros(v.shape[2], dtype=torch.int32), bits)


def attention(q, k, v):
    hq, hkv, n, t = q.shape[1], k.shape[1], k.shape[2], q.shape[2]
    k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.arange(n)[None, :] > (n - t + torch.arange(t))[:, None]
    return torch.softmax(s.masked_fill(causal, float("-inf")), -1) @ v


def errors(q, k, v, layer_idx=0):
    """{scheme: relative attention-output error} for one layer's states [B, H, N, D]."""
    rot = HadamardRotation(k.shape[1], k.shape[-1], 0, layer_idx, dtype=torch.float32)
    exact = attention(q, k, v)
    out = {}
    for kb, vb in ((4, 2), (2, 2), (4, 4), (8, 2)):
        for axis, group in (("channel", None), ("channel", 32), ("token", None)):
            for rotated in (False, True):
                kr, vr = (rot.rotate(k), rot.rotate(v)) if rotated else (k, v)
                kh, vh = keys_round_trip(kr, kb, axis, group), values_round_trip(vr, vb)
                if rotated:
                    kh, vh = rot.unrotate(kh), rot.unrotate(vh)
                name = f"K{kb}/V{vb} keys {axis}{'' if group is None else f' g{group}'}{' rotated' if rotated else ''}"
                out[name] = float((attention(q, kh, vh) - exact).norm() / exact.norm())
    return out


def random_case(d, seed=0, n=1024):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, n, d, generator=g)
    k[..., [3, 11, d // 2 + 1]] *= 15.0  # outlier key channels
    k[:, :, :4] *= 4.0  # sink-like outlier tokens
    v = torch.randn(1, 2, n, d, generator=g)
    v[..., [7]] *= 8.0
    q = torch.randn(1, 12, 32, d, generator=g)
    q[..., [3, 11, d // 2 + 1]] *= 0.3
    return q, k, v


def model_case(tokens):
    """The embedded model's queries (last 32) and post-RoPE K/V of every layer on an essay prompt."""
    import zipkv
    from transformers import DynamicCache

    from zipkv.eval.sources.prose import paul_graham_essays

    model, tok = zipkv.load_default_model()
    text = "\n\n".join(essay.text for essay in paul_graham_essays()[:8])
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    captured, queries = {}, {}
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb

    def capture(q, k, cos, sin, *a, **kw):
        qr, kr = original(q, k, cos, sin, *a, **kw)
        queries[len(queries)] = qr[:, :, -32:].detach().float()
        return qr, kr

    modeling_llama.apply_rotary_pos_emb = capture
    try:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, past_key_values=cache)
    finally:
        modeling_llama.apply_rotary_pos_emb = original
    for i, layer in enumerate(cache.layers):
        captured[i] = (queries[i], layer.keys.float(), layer.values.float())
    return captured


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    for d in (64, 128):
        results[f"random d={d}"] = errors(*random_case(d))
    if not args.no_model:
        per_layer = [errors(*states, layer_idx=i) for i, states in model_case(args.tokens).items()]
        results["embedded model (mean over layers)"] = {k: sum(e[k] for e in per_layer) / len(per_layer)
                                                       for k in per_layer[0]}
    for case, table in results.items():
        print(f"\n{case}")
        for name, err in table.items():
            print(f"  {name:40s} {err:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
