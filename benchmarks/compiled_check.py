"""GPU check of the compiled decode step (issue 19): Llama-3-8B shapes (hidden 4096, 32 query /
8 KV heads of 128, MLP 14336, vocab 128256), random bf16 weights, --layers of them (default 4).

Per method: ms per decode step of StaticDecoder (CUDA graph) with compile=False and with
compile=True (inductor, then the same graph capture), and of model.generate() with a cache made
by static_for_generate (transformers' own compiled path, mode "reduce-overhead"); the greedy
tokens of the three must agree (compile=False vs True: the same kernels, inductor's fused
norms/rotary may round differently, so the first mismatch step is reported, not asserted).
One JSON row per method under --out.

    python -m benchmarks.compiled_check --out $OUT --batch 8 --context 4096 --new 64
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def llama3_8b_shapes(device, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                         max_position_embeddings=131072, eos_token_id=None)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def first_mismatch(a: torch.Tensor, b: torch.Tensor):
    n = min(a.shape[1], b.shape[1])
    diff = (a[:, :n] != b[:, :n]).any(dim=0).nonzero()
    return None if diff.numel() == 0 else int(diff[0])


def static_decoder_run(model, method, kw, ids, mask, new, compile):
    """(tokens, ms per step after warm-up) of StaticDecoder with compile= (CUDA graph replays)."""
    import zipkv
    from zipkv.graph_decode import StaticDecoder, prompt_positions
    from zipkv.transformers_support import cache_kwargs

    cache = zipkv.make_cache(method, model.config, **kw)
    positions = prompt_positions(mask)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwargs(cache))
    first = out.logits[:, -1:].argmax(-1)
    del out
    decoder = StaticDecoder(model, cache, first, positions[:, -1] + 1, new, mask, compile=compile)
    tokens, warm = [first], 3
    for i in range(new - 1):
        if i == warm:
            torch.cuda.synchronize()
            start = time.perf_counter()
        tokens.append(decoder.step().clone())
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1000 / (new - 1 - warm)
    return torch.cat(tokens, 1), ms


def generate_run(model, method, kw, ids, mask, new):
    """(new tokens, ms per decode step) of model.generate with a static_for_generate cache: the
    median interval between generate()'s logits-processor calls (benchmarks.headline_rows
    .StepClock, CUDA events), skipping the first 4 steps, in a second call after a warm-up one
    of the same length (the same cache shapes: a call of another length would compile and
    capture again, which made the earlier difference of two calls' times negative)."""
    import statistics

    from transformers import LogitsProcessorList

    import zipkv
    from benchmarks.headline_rows import StepClock

    def once():
        cache = zipkv.make_cache(method, model.config, **kw).static_for_generate(model, new)
        clock = StepClock(ids.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                 logits_processor=LogitsProcessorList([clock]), **zipkv.cache_kwargs(cache))
        cache.step_hook.remove()
        return out[:, ids.shape[1]:], clock.intervals_ms()

    once()  # compiles and captures
    tokens, intervals = once()
    return tokens, statistics.median(intervals[4:])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--methods", default="zipkv,zipcache,kivi,snapkv")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    model = llama3_8b_shapes(device, args.layers)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128000, (args.batch, args.context), generator=g).to(device)
    mask = torch.ones_like(ids)
    if args.batch > 1:
        ids[1, :37], mask[1, :37] = 0, 0  # a left-padded row
    params = {"snapkv": dict(ratio=0.2), "zipcache": dict(stream_interval=32, residual_length=16)}
    rows = []
    for method in args.methods.split(","):
        kw = params.get(method, {})
        row = dict(method=method, **kw, batch=args.batch, context=args.context, layers=args.layers, new=args.new,
                   device=torch.cuda.get_device_name(), torch=torch.__version__)
        try:
            eager, row["ms_graph"] = static_decoder_run(model, method, kw, ids, mask, args.new, False)
            t = time.perf_counter()
            compiled, row["ms_graph_compiled"] = static_decoder_run(model, method, kw, ids, mask, args.new, True)
            row["compile_and_run_s"] = round(time.perf_counter() - t, 1)
            row["compiled_first_mismatch"] = first_mismatch(eager, compiled)
            generated, row["ms_generate"] = generate_run(model, method, kw, ids, mask, args.new)
            row["generate_first_mismatch"] = first_mismatch(compiled, generated)
            row["generate_x_graph_compiled"] = round(row["ms_generate"] / row["ms_graph_compiled"], 3)
        except Exception as error:  # a row says what failed; the others still run
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(os.path.join(args.out, "compiled_check.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
