"""Long generation soak (issue 21): N new tokens decoded greedily with a streaming-quantized
cache, one model forward per token, beside a DynamicCache teacher-forced on the SAME tokens
(so both see identical inputs and any gap is the cache's error, not a diverged sequence).

Every `--every` steps it records: the max |logit difference| since the last record and at
that step, the top-1 agreement since the last record, cache.stats() bytes_held against the
bytes of every tensor reachable from the cache (a walk over its objects: an untracked tensor
would show as a gap), the ratio (fp16 bytes / bytes held) and the process RSS.

    python -m experiments.long_generation --method zipkv --new-tokens 8192 --model tiny --out DIR

Writes DIR/<model>_<method>.json and .png (ratio and logit error vs tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import zipkv

# tests/tiny_models.py's Llama shapes (head_dim 16, 2 KV heads, 2 layers); the position
# limit is raised to fit the prompt and the new tokens.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
# objects whose tensors a cache holds: zipkv's own and transformers' cache layers
OWNED_MODULES = ("zipkv", "transformers.cache_utils")
# attributes pointing at what another object owns (the cache, a shared policy, aliases)
NOT_OWNED = ("owner", "policy", "recorded", "tier_stores")


def tiny_llama(positions: int, seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, max_position_embeddings=positions)).eval()


def reachable_bytes(root) -> int:
    """Bytes of every distinct tensor reachable from root through containers and zipkv /
    transformers cache objects (each tensor counted once): what the cache really keeps alive."""
    seen, stack, total = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif obj is root or (hasattr(obj, "__dict__") and type(obj).__module__.startswith(OWNED_MODULES)):
            stack.extend(v for k, v in vars(obj).items() if k not in NOT_OWNED)
    return total


def rss_mb() -> float:
    """Current resident set size (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def soak(model, prompt_ids, method: str, params: dict, new_tokens: int, every: int, log=print,
         max_seconds: float | None = None, on_record=None) -> dict:
    """Decode `new_tokens` greedily from the zipkv cache; feed the same tokens to a DynamicCache.
    max_seconds: stop at the first record past this much decoding time (records say how far).
    on_record(cache, record): called at every record (a test's own checks of the live cache)."""
    cache = zipkv.make_cache(method, model.config, **params)
    reference = DynamicCache(config=model.config)
    out = model(input_ids=prompt_ids, **zipkv.cache_kwargs(cache))
    ref = model(input_ids=prompt_ids, **zipkv.cache_kwargs(reference))
    records, window_err, window_agree, window_n, window_rel = [], 0.0, 0, 0, 0.0
    start = time.perf_counter()
    for step in range(1, new_tokens + 1):
        logits, ref_logits = out.logits[:, -1].float(), ref.logits[:, -1].float()
        err = float((logits - ref_logits).abs().max())
        window_err = max(window_err, err)
        window_rel = max(window_rel, err / float(ref_logits.abs().max()))
        token = logits.argmax(-1, keepdim=True)
        window_agree += int((token == ref_logits.argmax(-1, keepdim=True)).all())
        window_n += 1
        out = model(input_ids=token, **zipkv.cache_kwargs(cache))
        ref = model(input_ids=token, **zipkv.cache_kwargs(reference))
        if step % every == 0 or step == new_tokens:
            stats = cache.stats()
            record = dict(
                new_tokens=step, seq_len=cache.get_seq_length(), max_abs_logit_diff=window_err,
                step_abs_logit_diff=err, max_rel_logit_diff=window_rel, top1_agreement=window_agree / window_n,
                bytes_held=stats.bytes_held, reachable_bytes=reachable_bytes(cache), fp16_bytes=stats.fp16_bytes,
                ratio=stats.ratio, reference_bytes=reachable_bytes(reference), rss_mb=rss_mb(),
                seconds=time.perf_counter() - start,
            )
            records.append(record)
            if on_record is not None:
                on_record(cache, record)
            window_err, window_agree, window_n, window_rel = 0.0, 0, 0, 0.0
            log(f"{method} {step}/{new_tokens}: |dlogit| {record['max_abs_logit_diff']:.4f} "
                f"top1 {record['top1_agreement']:.3f} ratio {record['ratio']:.3f} "
                f"held {record['bytes_held']} reach {record['reachable_bytes']} rss {record['rss_mb']:.0f} MB "
                f"{record['seconds']:.0f} s")
            if max_seconds is not None and record["seconds"] > max_seconds:
                break
    return dict(records=records, summary=summarize(records, every))


def summarize(records: list[dict], every: int) -> dict:
    """Maxima over the run; the ratio's convergence over the records on the `every` grid (a
    last record off it holds a partly filled fp16 block, a sawtooth point, not a trend)."""
    grid = [r for r in records if r["new_tokens"] % every == 0] or records
    tail = grid[-max(2, len(grid) // 4):]
    return dict(
        max_abs_logit_diff=max(r["max_abs_logit_diff"] for r in records),
        max_rel_logit_diff=max(r["max_rel_logit_diff"] for r in records),
        min_top1_agreement=min(r["top1_agreement"] for r in records),
        mean_top1_agreement=sum(r["top1_agreement"] for r in records) / len(records),
        accounted_everywhere=all(r["bytes_held"] == r["reachable_bytes"] for r in records),
        final_ratio=records[-1]["ratio"],
        converged_ratio=grid[-1]["ratio"],
        last_quarter_ratio_spread=(max(r["ratio"] for r in tail) - min(r["ratio"] for r in tail)) / grid[-1]["ratio"],
        rss_mb_first=records[0]["rss_mb"], rss_mb_last=records[-1]["rss_mb"],
        bytes_held_last=records[-1]["bytes_held"],
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    x = [r["new_tokens"] for r in recs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(x, [r["ratio"] for r in recs])
    a.set(xlabel="new tokens", ylabel="fp16 bytes / bytes held", title=f"{result['method']} ratio")
    b.plot(x, [r["max_abs_logit_diff"] for r in recs], label="max |dlogit| (window)")
    b.set(xlabel="new tokens", ylabel="max |logit - reference logit|", title=f"{result['model']}: logit error")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_params(text: str) -> dict:
    params = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        params[key] = json.loads(value) if value not in ("True", "False") else value == "True"
    return params


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="zipkv")
    p.add_argument("--params", default="", help="method parameters, key=value,... (JSON values)")
    p.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    p.add_argument("--new-tokens", type=int, default=8192)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--every", type=int, default=256)
    p.add_argument("--max-seconds", type=float, default=None, help="stop at the first record past this time")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.new_tokens < 1:
        p.error(f"--new-tokens must be >= 1 (got {args.new_tokens})")
    if args.every < 1:
        p.error(f"--every must be >= 1 (got {args.every})")
    torch.manual_seed(0)
    if args.model == "tiny":
        model = tiny_llama(args.prompt_tokens + args.new_tokens + 1)
        prompt = torch.randint(3, TINY["vocab_size"], (1, args.prompt_tokens))
    else:
        model, tokenizer = zipkv.load_default_model()
        text = "The history of the printing press begins in the fifteenth century, when"
        prompt = tokenizer(text, return_tensors="pt").input_ids
    params = parse_params(args.params)
    result = dict(
        command=" ".join(["python -m experiments.long_generation"] + (argv or sys.argv[1:])),
        method=args.method, params=params, model=args.model, dtype=str(next(model.parameters()).dtype),
        prompt_tokens=int(prompt.shape[1]), new_tokens=args.new_tokens, every=args.every,
        machine=f"{platform.machine()} {torch.get_num_threads()} threads", torch=torch.__version__,
    )
    result.update(soak(model, prompt, args.method, params, args.new_tokens, args.every,
                        max_seconds=args.max_seconds))
    result["decoded_tokens"] = result["records"][-1]["new_tokens"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.model}_{args.method}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
