"""Decode with a zipkv cache under tensor parallelism: Llama-3-8B shapes, random weights.

    torchrun --nproc_per_node 2 -m benchmarks.tp_decode --out benchmarks/results/tp_decode_h200x2.json
    python -m benchmarks.tp_decode --out benchmarks/results/tp_decode_h200x1.json      # TP=1, the baseline
    torchrun --nproc_per_node 2 -m benchmarks.tp_decode --tiny --out /tmp/tp.json     # CPU, gloo, seconds

Every rank builds the same random model (same seed), which transformers' tensor-parallel plan
(`apply_tensor_parallelism` with the config's `base_model_tp_plan`: q/k/v column-wise, o/down
row-wise) then shards, so TP=1 and TP=2 run the same weights. For each method and (batch,
context): a chunked prefill of random tokens into `zipkv.parallel.make_tp_cache(method, ...)`,
then `--steps` greedy decode steps timed one by one (device synchronized); rank 0 writes one
JSON row per case: ms/step (median), greedy tokens, this rank's bytes and all ranks' total
(`sharded_stats`), peak device memory per rank. A case that runs out of memory is recorded as
"oom" (every rank must fail alike: the shapes are the same on each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def parse_cases(text: str) -> list[tuple[int, int]]:
    """'8x32768,4x131072' -> [(8, 32768), (4, 131072)] (batch x context)."""
    cases = []
    for part in text.split(","):
        batch, _, context = part.partition("x")
        if not batch.isdigit() or not context.isdigit() or int(batch) < 1 or int(context) < 2:
            raise SystemExit(f"--cases: {part!r} is not BATCHxCONTEXT (e.g. 8x32768)")
        cases.append((int(batch), int(context)))
    return cases


def setup(tiny: bool):
    """(device, TP mesh or None, rank, world size); torchrun's environment starts the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if tiny or not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world == 1:
        return device, None, rank, world
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo" if device.type == "cpu" else "nccl")
    return device, init_device_mesh(device.type, (world,), mesh_dim_names=("tp",)), rank, world


def build_model(tiny: bool, device, mesh, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    torch.manual_seed(0)
    config = LlamaConfig(**(TINY if tiny else LLAMA3_8B))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    if mesh is not None:
        # the plan's 'layers.*' wildcards, one entry per layer: each module's parameters are
        # sharded (what from_pretrained does while loading) and the module gets its hooks
        parameters = dict(model.named_parameters())
        expanded = {}
        for name, style in config.base_model_tp_plan.items():
            for i in range(config.num_hidden_layers):
                module = f"model.{name.replace('*', str(i))}"
                expanded.update({f"{module}.{p}": style for p in ("weight", "bias") if f"{module}.{p}" in parameters})
                expanded[module] = style
        apply_tensor_parallelism(model, mesh, expanded)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(model, method, batch, context, args, device, world):
    from zipkv.parallel import make_tp_cache, sharded_stats

    settings = {"budget": max(64, context // 8)} if method in ("snapkv", "adakv", "pyramidkv", "cake") else {}
    cache = make_tp_cache(method, model, **settings)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size - 1, (batch, context), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for start in range(0, context, args.prefill_chunk):
            out = model(input_ids=ids[:, start : start + args.prefill_chunk], cache=cache, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        tokens, times = [token], []
        for _ in range(args.steps):
            sync(device)
            began = time.perf_counter()
            out = model(input_ids=token, cache=cache, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            sync(device)
            times.append((time.perf_counter() - began) * 1e3)
            tokens.append(token)
    stats = sharded_stats(cache)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"method": method, "tp": world, "batch": batch, "context": context, "steps": args.steps,
            "ms_per_step": statistics.median(times), "ms_steps": times,
            "tokens": torch.cat(tokens, 1).tolist(), "rank_bytes": stats.rank_bytes,
            "ranks_bytes": stats.ranks_bytes, "total_bytes": stats.total_bytes, "fp16_bytes": stats.fp16_bytes,
            "peak_memory_rank0": peak}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tp_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama on the CPU (gloo): the CI check")
    ap.add_argument("--methods", default="full,zipkv", help="zipkv methods, comma-separated (default full,zipkv)")
    ap.add_argument("--cases", default=None, help="BATCHxCONTEXT list (default 8x32768,4x131072; --tiny 2x64)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 32; --tiny 4)")
    ap.add_argument("--prefill-chunk", type=int, default=4096, help="prompt tokens per prefill forward")
    ap.add_argument("--out", default=None, help="write the rows as JSON here (rank 0)")
    args = ap.parse_args(argv)
    cases = parse_cases(args.cases or ("2x64" if args.tiny else "8x32768,4x131072"))
    args.steps = args.steps or (4 if args.tiny else 32)
    if args.steps < 1 or args.prefill_chunk < 1:
        raise SystemExit("--steps and --prefill-chunk must be >= 1")
    import zipkv

    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if method not in zipkv.METHODS:
            raise SystemExit(f"--methods: {method!r} is not a zipkv method ({', '.join(zipkv.METHODS)})")
    device, mesh, rank, world = setup(args.tiny)
    model = build_model(args.tiny, device, mesh, torch.float32 if args.tiny else torch.bfloat16)
    rows = []
    for method in methods:
        for batch, context in cases:
            try:
                row = run_case(model, method, batch, context, args, device, world)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                row = {"method": method, "tp": world, "batch": batch, "context": context, "oom": True}
            rows.append(row)
            if rank == 0:
                print(json.dumps({k: v for k, v in row.items() if k not in ("tokens", "ms_steps")}), flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "world_size": world, "shapes": "tiny" if args.tiny else "llama3-8b",
                       "rows": rows}, f, indent=1)
    if mesh is not None:
        # every rank waits for the others before the group goes: a gloo rank that tears its
        # group down while a peer is still in a collective (or writing the JSON) aborts with
        # "terminate called without an active exception" (seen once in CI)
        dist.barrier()
        dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
