"""Probe saliency with the prompt attention's LSE: kernel v2 vs v1 (issue 6, 8K margin).

python -m experiments.probe_lse_v2 [--out DIR] [--reps 20]
python -m experiments.probe_lse_v2 --smoke     # CPU, Triton interpreter, tiny shapes

check  every variant vs probe_scores_reference on fresh random data on the device (GQA R = 4
       and 2, the attention op's LSE, keys no probe sees), counts exact
time   per context: one Llama-3-8B layer's prefill (causal F.sdpa + GEMMs) in the same run;
       each variant called as the layer calls it (whole query + LSE, rows, sorted positions),
       eager (host work included, GPU idle at the start: as probe_lse.json measured) in two
       rounds, and replayed from a CUDA graph (device work only); a profiler pass lists the
       kernels of the old and the new call. "old_main" is main's code path exactly (advanced
       indexing gathers, v1 kernel, normalization in two torch ops).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

from experiments import probe_lse as base

VARIANTS = {
    "auto_default": dict(),
    "v1_index_select": dict(kernel="v1"),
    "v2_w4s3": dict(kernel="v2"),
    "v2_w4s2": dict(kernel="v2", num_stages=2),
    "v2_w8s2": dict(kernel="v2", num_warps=8, num_stages=2),
    "v2_split2_w4s3": dict(kernel="v2", splits=2),
    "v2_indexed_w4s3": dict(kernel="v2", indexed=True),
}


ROUNDS = 2


def old_main_call(query, keys, probe_pos, lse, scaling, rows):
    """main's probe_scores_lse + probe_scores_lse_triton (positions_sorted=True), inlined."""
    import triton

    from zipkv.kernels import _triton_probe_lse as m

    lse = lse[:, :, : query.shape[2]].float()
    b, hq, _, d = query.shape
    hkv, t = keys.shape[1], keys.shape[2]
    dev = query.device
    pos = probe_pos.to(device=dev)
    pick = rows.to(device=dev)
    query, lse = query[:, :, pick], lse[:, :, pick]
    acc = torch.empty((b, hkv, t), device=dev, dtype=torch.float32)
    cnt = torch.empty((b, 1, t), device=dev, dtype=torch.float32)
    m._probe_lse_onepass_kernel[(triton.cdiv(t, 128), b * hkv)](
        query, query.stride(0), query.stride(1), query.stride(2), keys, keys.stride(0), keys.stride(1), keys.stride(2),
        pos, lse, lse.stride(0), lse.stride(1), acc, cnt, pos.numel(), t, hkv, hq // hkv,
        scaling * m._LOG2E, D=d, BLOCK_P=64, BLOCK_T=128, F32_DOT=dev.type != "cuda",
        ACC2D=True, EXP16=False, num_warps=4, num_stages=3)
    return acc / cnt.clamp_min(1.0), acc, cnt


def calls(q, k, rows, lse, scaling, extra=None):
    from zipkv.kernels.probe_scores import probe_scores_lse

    out = {"old_main": lambda: old_main_call(q, k, rows, lse, scaling, rows)}
    for name, kw in VARIANTS.items():
        kw = {**kw, **(extra or {})}
        out[name] = (lambda kw=kw: probe_scores_lse(q, k, rows, lse, scaling, rows=rows, impl="triton",
                                                    positions_sorted=True, **kw))
    return out


def check_section(dev, dtype):
    from zipkv.kernels.probe_scores import probe_scores_reference

    out = []
    g = torch.Generator(device=dev).manual_seed(int(time.time()) % 100000)  # fresh data every run
    cases = ((2, base.HKV, base.HQ // base.HKV, 3000, {}, "probes"), (1, 2, 2, 777, dict(block_p=32, block_t=64), "probes"),
             (1, base.HKV, base.HQ // base.HKV, 2500, {}, "early_only"))
    for b, hkv, r, t, block, kind in cases:
        if dev.type != "cuda":
            t = min(t, 200)
        q = (torch.randn(b, hkv * r, t, base.D, device=dev, generator=g) * 2).to(dtype)
        k = torch.randn(b, hkv, t, base.D, device=dev, generator=g).to(dtype)
        scaling = base.D**-0.5
        if kind == "probes":
            rows = base.probe_rows(t, dev, seed=int(torch.randint(0, 1000, (1,), generator=g, device=dev)))
        else:  # probes only in the first 60%: the keys past the last probe are seen by none
            rows = torch.randperm(int(0.6 * t), device=dev, generator=g)[: max(4, t // 20)].sort().values
        ref = probe_scores_reference(q[:, :, rows], k, rows, None, scaling)
        lse = None
        if dev.type == "cuda":
            from zipkv.kernels.attention_lse import causal_attention_lse

            res = causal_attention_lse(q, k, k, scaling)
            lse = res[1] if res is not None else None
        if lse is None:
            lse = base.ref_lse(q, k, scaling)
        for name, fn in calls(q, k, rows, lse, scaling, block).items():
            if block and name == "old_main":
                continue  # main's call has fixed tiles
            rec = {"b": b, "hkv": hkv, "r": r, "t": t, "rows": kind, "probes": rows.numel(), "variant": name, **block}
            try:
                got = fn()
                for nm, o, e in zip(("normalized", "accumulated", "counts"), got, ref):
                    rec[nm + "_rel_err"] = base.rel(o, e)
                    rec[nm + "_finite"] = bool(torch.isfinite(o).all())
                rec["counts_exact"] = bool(torch.equal(got[2], ref[2]))
                unseen = int(rows.max()) + 1
                rec["unseen_keys"] = t - unseen
                rec["unseen_zero"] = bool(got[1][..., unseen:].abs().max() == 0) if unseen < t else True
            except Exception as e:
                rec["error"] = repr(e)[:500]
            out.append(rec)
    return out


def kernel_profile(fn, dev):
    if dev.type != "cuda":
        return {}
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ks = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n = e.name[:70]
            ks[n] = ks.get(n, 0.0) + e.device_time / 1e3  # ms
    return ks


def time_section(dev, dtype, t, reps):
    from benchmarks.timing import time_calls

    tm = base.timer(dev, reps)
    g = torch.Generator(device=dev).manual_seed(t)
    q = torch.randn(1, base.HQ, t, base.D, device=dev, generator=g).to(dtype)
    k = torch.randn(1, base.HKV, t, base.D, device=dev, generator=g).to(dtype)
    v = torch.randn(1, base.HKV, t, base.D, device=dev, generator=g).to(dtype)
    scaling = base.D**-0.5
    rows = base.probe_rows(t, dev)
    pairs = int((rows + 1).sum()) * base.HQ
    res = {"context": t, "probes": rows.numel(), "qk_gflop": 2 * base.D * pairs / 1e9}
    gemm, _ = base.llama_gemms(t, dev, dtype)
    ops = base.attention_ops(q, k, v, scaling)
    res["gemm_ms"] = tm(gemm)
    res["sdpa_ms_1"] = tm(ops["sdpa_default"])
    lse = ops["zipkv_entry"]()[1] if dev.type == "cuda" else base.ref_lse(q, k, scaling)
    fns = calls(q, k, rows, lse, scaling)
    res["eager"] = {n: [] for n in fns}
    for rnd in range(1, ROUNDS + 1):  # interleaved rounds: the spread between them is the noise
        for n, fn in fns.items():
            try:
                res["eager"][n].append(tm(fn))
            except Exception as e:
                res.setdefault("errors", {})[n] = repr(e)[:300]
        print(f"  T={t} eager round {rnd}: " + " ".join(f"{n}={v[-1]:.3f}" for n, v in res["eager"].items() if v), flush=True)
    res["sdpa_ms_2"] = tm(ops["sdpa_default"])
    res["sdpa_ms"] = (res["sdpa_ms_1"] + res["sdpa_ms_2"]) / 2
    res["layer_ms"] = res["sdpa_ms"] + res["gemm_ms"]
    res["graph"] = {}
    if dev.type == "cuda":
        for n, fn in fns.items():
            if n in res.get("errors", {}):
                continue
            try:
                res["graph"][n] = time_calls([fn], reps=reps, warmup=3, graph=True)["ms"]
            except Exception as e:
                res.setdefault("graph_errors", {})[n] = repr(e)[:300]
        res["profile"] = {n: kernel_profile(fns[n], dev) for n in ("old_main", "auto_default", "v2_w4s3") if n in fns}
    res["eager_ms"] = {n: sum(v) / len(v) for n, v in res["eager"].items() if v}
    res["eager_fraction"] = {n: ms / res["layer_ms"] for n, ms in res["eager_ms"].items()}
    res["graph_fraction"] = {n: ms / res["layer_ms"] for n, ms in res["graph"].items()}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.probe_lse_v2")
    base.add_common_arguments(ap)
    ap.add_argument("--variants", default="", help="comma-separated subset of VARIANTS (old_main always runs)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default="probe_lse_v2")
    args = ap.parse_args(argv)
    global ROUNDS
    ROUNDS = args.rounds
    if args.variants:
        keep = args.variants.split(",")
        for n in list(VARIANTS):
            if n not in keep:
                del VARIANTS[n]
    if args.smoke:
        from zipkv.kernels._runtime import enable_interpreter

        enable_interpreter()
        base.HQ, base.HKV, base.D, base.HIDDEN, base.QKV, base.INTER = 4, 2, 32, 64, 96, 128
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16
    contexts = [256] if args.smoke else [int(c) for c in args.contexts.split(",")]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, args.name + ".json")
    res = {"command": " ".join(["python", "-m", "experiments.probe_lse_v2"] + (argv if argv is not None else sys.argv[1:])),
           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if dev.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cudnn=torch.backends.cudnn.version())
    res["env"] = info

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    try:
        res["check"] = check_section(dev, dtype)
    except Exception:
        res["check_error"] = traceback.format_exc()
    save()
    base.time_contexts(res, contexts, save, lambda t: time_section(dev, dtype, t, args.reps))
    print("\n==== checks (rel err vs probe_scores_reference; counts exact; unseen keys zero) ====")
    print(res.get("check_error", "")[-1500:])
    for c in res.get("check", []):
        if "error" in c:
            print("CHECK ERROR", c)
            continue
        print(f"{c['variant']:16s} R={c['r']} t={c['t']} {c['rows']:10s} norm {c['normalized_rel_err']:.1e} acc {c['accumulated_rel_err']:.1e}"
              f" counts_exact={c['counts_exact']} unseen({c['unseen_keys']})_zero={c['unseen_zero']} finite={c['normalized_finite'] and c['accumulated_finite']}")
    print("\n==== time (ms; % of one layer's prefill = causal F.sdpa + GEMMs, same run) ====")
    print(res["env"])
    for r in res["time"]:
        if "error" in r:
            print(r["context"], "ERROR", r["error"][-1500:])
            continue
        print(f"T={r['context']} probes={r['probes']} layer {r['layer_ms']:.3f} (sdpa {r['sdpa_ms_1']:.3f}/{r['sdpa_ms_2']:.3f} + gemm {r['gemm_ms']:.3f})")
        for n, v in r["eager"].items():
            gms = r["graph"].get(n, float("nan"))
            print(f"  {n:16s} eager {'/'.join(f'{x:.3f}' for x in v)} = {100 * r['eager_fraction'].get(n, float('nan')):.2f}%"
                  f"   graph {gms:.3f} = {100 * gms / r['layer_ms']:.2f}%")
        for n, ks in r.get("profile", {}).items():
            print(f"  profile {n}: " + "; ".join(f"{k_[:40]} {ms:.3f}" for k_, ms in ks.items()))
        if r.get("errors") or r.get("graph_errors"):
            print("  errors", r.get("errors"), r.get("graph_errors"))


if __name__ == "__main__":
    main()
