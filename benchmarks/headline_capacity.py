"""Capacity stage of the headline benchmark: the largest batch that fits under a memory cap.

For each method and context the row is measured at batch 1 and batch 2 (fill, static decoder,
a few steps); everything a run holds grows linearly with the batch (cache bytes, static room,
decode workspace, fill temporaries), so the peak of the whole row, weights included, is
peak(B) = fixed + per_seq x B and the largest batch under the cap is
floor((cap - fixed) / per_seq). On the GPU the peaks are the allocator's (max of fill, move to
static buffers and decode); on the CPU, which has no allocator figures, the bytes held
(`bytes_held`) over the weights. The prediction is then checked by really allocating it for one
method (decode steps at the predicted batch, the cap enforced with
torch.cuda.set_per_process_memory_fraction), and one sequence more, expected not to fit.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from benchmarks import e2e_decode as e2e
from benchmarks.headline_rows import measure_row

GiB = 2**30


def row_peak_bytes(rec: dict) -> float:
    """The peak of a whole row (fill, move to static buffers, decode), weights included."""
    return GiB * max(rec.get("fill_peak_gib", 0.0), rec.get("setup_peak_gib", 0.0), rec.get("peak_gib", 0.0))


def predict(one: dict, two: dict, cap_bytes: float, weight_bytes: int, cuda: bool) -> dict:
    """Linear fit through the rows at batch 1 and 2 -> the largest batch under cap_bytes."""
    if cuda:
        p1, p2, basis = row_peak_bytes(one), row_peak_bytes(two), "allocator peak of the whole row (weights included)"
    else:
        p1, p2 = weight_bytes + one["bytes_held"], weight_bytes + two["bytes_held"]
        basis = "weights + bytes held (CPU: no allocator figures)"
    per_seq = p2 - p1
    fixed = p1 - per_seq
    out = dict(basis=basis, per_seq_bytes=per_seq, fixed_bytes=fixed,
               bytes_held_per_seq=two["bytes_held"] - one["bytes_held"],
               kv_bytes_per_seq=two["kv_bytes"] - one["kv_bytes"],
               workspace_gib_at_1=one.get("workspace_gib"), workspace_gib_at_2=two.get("workspace_gib"))
    out["predicted_max_batch"] = int((cap_bytes - fixed) // per_seq) if per_seq > 0 else None
    return out


def capped(device, cap_gib: float):
    """Enforce the cap on the CUDA allocator (a fraction of the device). Returns the indexed
    device whose cap is set (the allocator refuses an index-less "cuda"), None off CUDA."""
    if device.type != "cuda":
        return None
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(float(min(1.0, cap_gib * GiB / total)), device)
    return device


def check_batch(row: str, s, batch: int, context: int, cap_gib: float) -> dict:
    """Allocate and decode `row` at `batch` under the enforced cap."""
    capped_device = capped(s.device, cap_gib)
    try:
        rec = measure_row(row, s, batch, context)
    finally:
        if capped_device is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, capped_device)
        e2e.free_memory(s.device)
    enforced = capped_device is not None
    ran = "error" not in rec
    # unenforced (CPU): it fits if the weights + bytes held, the basis of the prediction there,
    # stay under the cap
    peak_gib = (row_peak_bytes(rec) if s.cuda else s.weight_bytes + rec["bytes_held"]) / GiB if ran else None
    fits = ran and (enforced or peak_gib <= cap_gib)
    out = dict(batch=batch, context=context, fits=fits, cap_enforced=enforced, peak_gib=peak_gib)
    if ran:
        out.update(ms_per_step=rec["ms_per_step"], tokens_per_s=rec["tokens_per_s"])
    else:
        out.update(error=rec["error"][:300], oom=rec.get("oom"))
    return out


def search_batch(check, predicted: int, deadline: float, record, log, grow: float = 1.25, tries: int = 8):
    """The largest batch that fits, measured: the prediction, then up by `grow` while it fits
    (the fit through batch 1 and 2 is conservative where the prefill's transients dominate
    small batches) or down by halves while it does not, then bisection between the last fit and
    the first failure. Returns the largest fitting batch seen (None if none did)."""
    fit, fail, batch = 0, None, max(1, predicted)
    for _ in range(tries):
        if time.perf_counter() > deadline:
            record({"batch": batch, "fits": None, "error": "skipped: deadline"})
            log(f"capacity check {batch}: skipped (deadline)")
            break
        out = check(batch)
        record(out)
        log(f"capacity check {batch}: {'fits' if out['fits'] else 'does not fit'}")
        if out["fits"]:
            fit = max(fit, batch)
        else:
            fail = batch if fail is None else min(fail, batch)
        if fail is not None and fail - fit <= 1:
            break
        if fail is None:
            batch = max(batch + 1, int(batch * grow))
        elif fit == 0:
            batch = max(1, batch // 2)  # below fail: fail = 1 ended the search above
        else:
            batch = (fit + fail) // 2
    return fit or None


def run_capacity(rows, contexts, s, cap_gib: float, check_row: str | None, deadline: float, log) -> dict:
    """The capacity section of the JSON."""
    small = dataclasses.replace(s, runs=1, steps=4, profile=())
    res = dict(memory_cap_gib=cap_gib, contexts=list(contexts), methods={}, checks=[],
               decode_room_steps=small.warmup + (small.runs + 1) * small.steps + 8,  # static buffers' room per row
               note="the static rows hold room for decode_room_steps more tokens; the eager rows none")
    for row in rows:
        for context in contexts:
            key = f"{row}@{context}"
            if time.perf_counter() > deadline:
                res["methods"][key] = {"row": row, "context": context, "error": "skipped: deadline"}
                continue
            one, two = (measure_row(row, small, b, context) for b in (1, 2))
            bad = [r for r in (one, two) if "error" in r]
            entry = {"row": row, "context": context}
            if bad:
                entry["error"] = bad[0]["error"]
            else:
                entry.update(predict(one, two, cap_gib * GiB, s.weight_bytes, s.cuda))
                entry["ms_per_step_at_1"] = one["ms_per_step"]
            res["methods"][key] = entry
            log(f"capacity {key}: {entry.get('predicted_max_batch', entry.get('error'))}")
    if check_row:
        for context in contexts:
            entry = res["methods"].get(f"{check_row}@{context}", {})
            predicted = entry.get("predicted_max_batch")
            if not predicted:
                continue
            measured = search_batch(lambda b: check_batch(check_row, small, b, context, cap_gib), predicted, deadline,
                                    lambda out: res["checks"].append(dict(row=check_row, predicted=predicted, **out)), log)
            entry["measured_max_batch"] = measured
            break  # one context checked is the acceptance; the others cost minutes
    return res
