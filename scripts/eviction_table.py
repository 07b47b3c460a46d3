"""Acceptance table of the eviction family on the embedded model (issue 5).

Passkey prompts (methods.md section 5) at the given lengths and depths; the context is
prefilled ONCE per case with a lossless recording cache (per-layer keys, values, queries:
identical for every method, since a prefill attends in full before anything is dropped),
each method's cache is built from that record, then the question is decoded on top of the
compressed context, greedy. Reports accuracy and the bytes each cache really holds.
ZipVL with sparse_prefill=True changes the prompt forward itself (attention on the important
tokens only), so it cannot be built from the dense record: those rows prefill the context
live through their own cache, and also report the kept (important) fraction per layer and
the attention FLOPs saved vs dense causal attention.

    python scripts/eviction_table.py --threads 1 --lengths 1024 2048 --question-aware-lengths \
        --sparse-taus 0.999 --only full "zipvl (v1" "zipvl_v2 (4-bit" --out results/eviction/sparse_prefill.json

    python scripts/eviction_table.py --threads 1 --lengths 2048 4096 --out results/eviction/passkey.json

One torch thread: on the shared 2-core machine small decode ops ran 10x faster than with two
(thread oversubscription); the whole table took 24 minutes there.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from zipkv import cache_kwargs

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


# the methods run at each --ratios value (zipkv.METHODS names; checked before the model loads)
RATIO_METHODS = ("streaming_llm", "h2o", "snapkv", "pyramidkv", "adakv", "cake")


def configs(ratios, byte_ratio, sparse_taus=()):
    """(label, method, params) rows of the table; sparse_taus: extra ZipVL v1 taus, each run
    with and without sparse prefill."""
    rows = [("full", "full", {})]
    for r in ratios:
        for method in RATIO_METHODS:
            rows.append((f"{method}@{r:g}", method, dict(ratio=r)))
        rows.append((f"zipvl_v2@{r:g}", "zipvl_v2", dict(ratio=r, tau=0.97)))  # important capped at r
    rows.append(("zipvl (v1, 4/2-bit)", "zipvl", dict(tau=0.97)))
    rows.append(("zipvl (v1, 4/2-bit) sparse prefill", "zipvl", dict(tau=0.97, sparse_prefill=True)))
    rows.append(("zipvl_v2 (4-bit, rest evicted)", "zipvl_v2", dict(tau=0.97)))
    rows.append(("zipvl_v2 (4-bit, rest evicted) sparse prefill", "zipvl_v2", dict(tau=0.97, sparse_prefill=True)))
    for tau in sparse_taus:
        rows.append((f"zipvl (v1, 4/2-bit) tau={tau:g}", "zipvl", dict(tau=tau)))
        rows.append((f"zipvl (v1, 4/2-bit) tau={tau:g} sparse prefill", "zipvl", dict(tau=tau, sparse_prefill=True)))
    b = byte_ratio
    rows += [
        (f"3-tier 4-bit only @{b:g}B", "three_tier", dict(byte_ratio=b, high_share=1.0, high_bits=4, low_bits=2)),
        (f"3-tier 8/4 @{b:g}B", "three_tier", dict(byte_ratio=b, high_share=0.5, high_bits=8, low_bits=4)),
        (f"3-tier 4/2 @{b:g}B", "three_tier", dict(byte_ratio=b, high_share=0.5, high_bits=4, low_bits=2)),
        (f"3-tier 16/4 @{b:g}B", "three_tier", dict(byte_ratio=b, high_share=0.5, high_bits=16, low_bits=4)),
    ]
    return rows


def context_ids(tok, length, depth, key):
    """Token ids of a passkey context whose length plus the question's is about `length`."""
    question = len(tok(QUESTION, add_special_tokens=False).input_ids)
    per_line = len(tok(NOISE * 20, add_special_tokens=False).input_ids) / 20
    fixed = len(tok(INTRO + NEEDLE.format(key=key), add_special_tokens=True).input_ids)
    n_noise = max(1, int((length - question - fixed) / per_line))
    while True:
        before = round(depth * n_noise)
        text = INTRO + NOISE * before + NEEDLE.format(key=key) + NOISE * (n_noise - before)
        ids = tok(text, return_tensors="pt").input_ids
        if ids.shape[1] + question <= length or n_noise == 1:
            return ids
        n_noise -= 1


def sparse_summary(stats) -> dict:
    """What a ZipVL sparse prefill kept and saved (EvictionStats.sparse_prefill, per-row detail left out)."""
    return {k: stats.sparse_prefill[k] for k in ("kept_fraction", "kept_fraction_per_layer", "flop_saving",
                                                 "flop_saving_with_probes")}


def decode(model, cache, question_ids, steps):
    out = []
    with torch.no_grad():
        tokens = question_ids
        for _ in range(steps):
            tokens = model(input_ids=tokens, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            out.append(int(tokens))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.1])
    parser.add_argument("--byte-ratio", type=float, default=0.1)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--sparse-taus", type=float, nargs="*", default=[],
                        help="extra ZipVL v1 taus, each with and without sparse prefill")
    parser.add_argument("--only", nargs="*", help="labels (prefix match) to run, default all")
    parser.add_argument("--question-aware-lengths", type=int, nargs="*", default=[2048],
                        help="also compress context + question together (SnapKV's own setting) at these lengths")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/eviction/passkey.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import zipkv
    from zipkv.cache.eviction_cache import record_prefill
    from zipkv.eviction_cache import make_eviction_cache
    from zipkv.registry import check_method

    started = time.time()
    rows = configs(args.ratios, args.byte_ratio, args.sparse_taus)
    for _, method, params in rows:  # a bad setting fails now, not an hour in
        check_method(method, params)
    model, tok = zipkv.load_default_model(progress=False)
    if args.only:
        rows = [r for r in rows if any(r[0].startswith(p) for p in args.only)]
    qa_rows = [(label, method, params) for label, method, params in configs(args.ratios, args.byte_ratio)
               if method in RATIO_METHODS]
    qa_rows += [row for row in rows if row[1] in ("zipvl", "zipvl_v2")]  # ZipVL's own setting: question in the prompt
    if args.only:
        qa_rows = [r for r in qa_rows if any(r[0].startswith(p) for p in args.only)]
    qa_rows = [(f"qa:{label}", method, params) for label, method, params in qa_rows]
    results = {label: {"method": method, "params": params, "cases": []} for label, method, params in rows + qa_rows}
    rng = random.Random(args.seed)
    question_ids = tok(QUESTION, add_special_tokens=False, return_tensors="pt").input_ids
    for length in args.lengths:
        for depth in args.depths:
            key = str(rng.randint(10000, 99999))
            ids = context_ids(tok, length, depth, key)
            t0 = time.time()
            records, _, full_cache = record_prefill(model, ids)
            prefill_s = time.time() - t0
            for label, method, params in rows:
                t1 = time.time()
                if method == "full":
                    cache = full_cache
                elif params.get("sparse_prefill"):
                    cache = make_eviction_cache(method, model.config, **params)
                    with torch.no_grad():
                        model(input_ids=ids, **cache_kwargs(cache), logits_to_keep=1)
                else:
                    cache = make_eviction_cache(method, model.config, **params).prefill_from_states(records)
                build_s = time.time() - t1
                stats = cache.stats()
                answer = tok.decode(decode(model, cache, question_ids, args.new_tokens))
                case = dict(length=length, context_tokens=ids.shape[1], depth=depth, key=key, answer=answer,
                            correct=key in answer, bytes_held=stats.bytes_held,
                            fp16_bytes=stats.fp16_bytes, kept_fraction=stats.kept_fraction,
                            peak_bytes=stats.peak_bytes, build_s=round(build_s, 2),
                            decode_s=round(time.time() - t1 - build_s, 2))
                if method == "full":
                    case["bytes_held_fp16"] = stats.fp16_bytes  # the model is fp32; fp16 is the baseline
                sparse = ""
                if stats.sparse_prefill is not None:
                    sp = case["sparse_prefill"] = sparse_summary(stats)
                    sparse = (f" | prefill kept {sp['kept_fraction']:.3f}, attention FLOPs "
                              f"{-100 * sp['flop_saving']:+.1f}% ({-100 * sp['flop_saving_with_probes']:+.1f}% w/ probes)")
                results[label]["cases"].append(case)
                print(f"{length:5d} d={depth:.1f} {label:32s} {'OK ' if case['correct'] else 'no '} "
                      f"{answer!r:28s} kept {stats.kept_fraction:6.3f} bytes {stats.bytes_held / 1e6:7.2f} MB "
                      f"build {build_s:5.1f}s{sparse}", flush=True)
                del cache
            print(f"-- prefill {prefill_s:.1f}s, elapsed {time.time() - started:.0f}s", flush=True)
            del records, full_cache
            if length in (args.question_aware_lengths or []):
                # the question is part of the compressed prompt: the first answer token comes
                # from the prefill, the rest is decoded on the compressed cache
                prompt = torch.cat([ids, question_ids], 1)
                records, logits, _ = record_prefill(model, prompt)
                dense_first = logits[:, -1:].argmax(-1)
                for label, method, params in qa_rows:
                    first = dense_first
                    if params.get("sparse_prefill"):  # the first answer token comes from the sparse prefill
                        cache = make_eviction_cache(method, model.config, **params)
                        with torch.no_grad():
                            first = model(input_ids=prompt, **cache_kwargs(cache), logits_to_keep=1).logits.argmax(-1)
                    else:
                        cache = make_eviction_cache(method, model.config, **params).prefill_from_states(records)
                    stats = cache.stats()
                    answer = tok.decode([int(first)] + decode(model, cache, first, args.new_tokens - 1))
                    case = dict(
                        length=length, context_tokens=prompt.shape[1], depth=depth, key=key,
                        answer=answer, correct=key in answer, bytes_held=stats.bytes_held,
                        fp16_bytes=stats.fp16_bytes, kept_fraction=stats.kept_fraction, peak_bytes=stats.peak_bytes)
                    if stats.sparse_prefill is not None:
                        case["sparse_prefill"] = sparse_summary(stats)
                    results[label]["cases"].append(case)
                    print(f"{length:5d} d={depth:.1f} {label:32s} {'OK ' if key in answer else 'no '} {answer!r}",
                          flush=True)
                del records

    table = summarize(results, args.lengths)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        model="SmolLM2-135M-Instruct (embedded, fp32, CPU)", torch_threads=torch.get_num_threads(),
        lengths=args.lengths, depths=args.depths, seconds=round(time.time() - started),
        table=table, results=results), indent=1))
    print(markdown(table, args.lengths))
    print(f"saved {out} in {time.time() - started:.0f}s")


def summarize(results, lengths):
    table = []
    for label, entry in results.items():
        if not entry["cases"]:
            continue
        row = {"label": label}
        for length in lengths:
            cases = [c for c in entry["cases"] if c["length"] == length]
            if not cases:
                continue
            held = [c.get("bytes_held_fp16", c["bytes_held"]) for c in cases]
            row[str(length)] = dict(
                correct=sum(c["correct"] for c in cases), cases=len(cases),
                mean_bytes=round(sum(held) / len(held)),
                fp16_full_bytes=round(sum(c["fp16_bytes"] for c in cases) / len(cases)),
                kept_fraction=round(sum(c["kept_fraction"] for c in cases) / len(cases), 4),
            )
            sparse = [c["sparse_prefill"] for c in cases if "sparse_prefill" in c]
            if sparse:
                mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
                row[str(length)]["sparse_prefill"] = dict(
                    kept_fraction=mean([x["kept_fraction"] for x in sparse]),
                    kept_fraction_per_layer=[mean(col) for col in zip(*(x["kept_fraction_per_layer"] for x in sparse))],
                    flop_saving=mean([x["flop_saving"] for x in sparse]),
                    flop_saving_with_probes=mean([x["flop_saving_with_probes"] for x in sparse]),
                )
        table.append(row)
    return table


def markdown(table, lengths):
    head = "| method | " + " | ".join(f"{n} right | {n} KB held (% of fp16) | {n} kept" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(lengths))]
    for row in table:
        cells = []
        for n in lengths:
            r = row.get(str(n))
            if r is None:
                cells += ["-", "-", "-"]
                continue
            share = 100 * r["mean_bytes"] / r["fp16_full_bytes"] if r["fp16_full_bytes"] else 0
            cells += [f"{r['correct']}/{r['cases']}", f"{r['mean_bytes'] / 1024:.0f} ({share:.1f}%)",
                      f"{r['kept_fraction']:.3f}"]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    for row in table:
        for n in lengths:
            sp = (row.get(str(n)) or {}).get("sparse_prefill")
            if sp:
                lines.append(f"\n{row['label']} @ {n}: prefill kept {100 * sp['kept_fraction']:.1f}% of the tokens, "
                             f"attention FLOPs {-100 * sp['flop_saving']:+.1f}% vs dense causal "
                             f"({-100 * sp['flop_saving_with_probes']:+.1f}% counting the probes); kept per layer: "
                             + " ".join(f"{x:.2f}" for x in sp["kept_fraction_per_layer"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
