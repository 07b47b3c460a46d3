"""H2O's per-step bookkeeping over a static layer's slots, for any number of slots, each with
its PyTorch reference:

- attention_mass: this step's attention probabilities added to per-slot totals,
  p_j = exp(scale * q . k_j - lse) for the visible slots (slot < lengths[-1] and real), the
  mean over the query heads of each KV head (as the eager H2O policy sums them). The softmax
  normalizer is the log-sum-exp the decode attention already computed
  (decode_attention(..., return_lse=True): [B, Hq, 1], natural log), so the kernel needs one
  pass over the keys, parallel over (row, KV head, block of slots). The scores are float32,
  as the eager policy computes them; the normalizer is the decode kernel's, which on CUDA
  rounds q * scale to the key dtype first: a head's probabilities then sum to 1 within a few
  1e-3 (bf16), a factor shared by all its slots, so one step's ranking is unchanged by it.
- lowest_slot: per (row, KV head) the eligible slot (visible, stamp <= newest - recent[b])
  of the lowest total, the oldest (lowest stamp) among equals: the token H2O evicts.
- attention_mass_and_lowest_slot: both in one pass (the kernel chooses per block while the
  new totals are in registers, then a small launch merges the blocks' choices).
- attention_mass_from_scores: the same from the scores the decode attention wrote
  (decode_attention(..., scores_out=...)) instead of the keys.

Bytes per call (the kernel): the keys of the visible slots once, the totals read and
written, the stamps read, the real mask; nothing else of size slots x head_dim. Re-reading
the keys is what this costs beyond the decode attention: the probabilities need the final
normalizer, which exists only after the attention's pass over every key.

H2O's static step per layer at Llama-3-8B shapes, 8 x 32K, ratio 0.2 (6554 slots per row and
KV head, 8 KV heads, d 128, bf16): the decode attention reads keys and values (214.8 MB), this
pass the keys again (107.4 MB), totals read and written (2 x 1.7 MB), stamps (1.7 MB, int32),
real (52 KB): 327.4 MB a layer, 10.48 GB for 32 layers; with the weights (15.0 GB) over the
copy bandwidth (4.14 TB/s) 6.15 ms a step, 1.16x the roofline of weights + bytes held (5.31 ms).
The floor below that: the decode attention hands over its scores (R x 4 bytes per slot and
KV head written and read again, instead of 2 x D bytes of keys read): `decode_attention(...,
scores_out=...)` then `attention_mass_from_scores`, what the static h2o layer runs (8 x 32K
compiled on the H200: 8.15 ms a step, was 9.26 with the key pass).

Tests: tests/test_kernels_attention_mass.py (Triton interpreter), tests/test_gpu_attention_mass.py.
"""

from __future__ import annotations

import torch

from ._runtime import use_triton
from .ops import mutating_op

HEAD_DIMS = (16, 32, 64, 128, 256)


def attention_mass_reference(query, keys, lengths, real, lse, totals, scaling: float) -> None:
    b, hkv, n, d = keys.shape
    r = query.shape[1] // hkv
    q = query[:, :, 0].float().reshape(b, hkv, r, d)
    s = torch.einsum("bhrd,bhnd->bhrn", q, keys.float()) * scaling
    visible = visible_slots(real, lengths, n)[:, :, None, :]  # [B, 1 or H, 1, N]
    lse = lse[:, :, 0].float().reshape(b, hkv, r, 1)
    p = torch.exp(s - lse).masked_fill(~(visible & torch.isfinite(lse)), 0.0)
    totals += p.sum(dim=2) / r


def lowest_slot_reference(totals, stamp, real, lengths, newest, recent, free) -> None:
    n = totals.shape[-1]
    eligible = visible_slots(real, lengths, n) & (stamp <= (newest - recent)[:, None, None])
    masked = totals.masked_fill(~eligible, float("inf"))
    lowest = masked == masked.amin(dim=-1, keepdim=True)
    oldest = stamp.long().masked_fill(~(lowest & eligible), torch.iinfo(torch.int64).max)
    free.copy_(oldest.argmin(dim=-1))  # no eligible slot: 0


def visible_slots(real, lengths, n: int) -> torch.Tensor:
    """bool [B, 1 or H, N]: real and before the count lengths[-1] (read on the device)."""
    slots = torch.arange(n, device=real.device)
    visible = real & (slots < lengths[-1])
    return visible[:, None, :] if real.dim() == 2 else visible


def check_mass(query, keys, lengths, real, lse, totals) -> None:
    """ValueError naming the argument whose shape or dtype does not fit."""
    if keys.dim() != 4:
        raise ValueError(f"keys must be [B, Hkv, N, D] (got {tuple(keys.shape)})")
    b, hkv, n, d = keys.shape
    if query.dim() != 4 or query.shape[0] != b or query.shape[2] != 1 or query.shape[3] != d or query.shape[1] % hkv:
        raise ValueError(f"query must be [B, Hq, 1, D] = [{b}, k * {hkv}, 1, {d}] (got {tuple(query.shape)})")
    if lse.shape != (b, query.shape[1], 1):
        raise ValueError(f"lse must be [B, Hq, 1] = {(b, query.shape[1], 1)}, decode_attention(..., return_lse=True)'s "
                         f"(got {tuple(lse.shape)})")
    check_slots(totals, real, lengths, (b, hkv, n))


def check_slots(totals, real, lengths, shape) -> None:
    b, h, n = shape
    if totals.shape != (b, h, n) or totals.dtype != torch.float32:
        raise ValueError(f"totals must be float32 [B, H, N] = {(b, h, n)} (got {totals.dtype} {tuple(totals.shape)})")
    if real.dtype != torch.bool or real.shape not in ((b, n), (b, h, n)):
        raise ValueError(f"real must be bool [B, N] or [B, H, N] with B, H, N = {b}, {h}, {n} "
                         f"(got {real.dtype} {tuple(real.shape)})")
    if lengths.dtype != torch.int32 or lengths.dim() != 1 or lengths.numel() < 1:
        raise ValueError(f"lengths must be int32 [k >= 1] (its last entry counts the slots; got {lengths.dtype} "
                         f"{tuple(lengths.shape)})")


def check_choice(totals, stamp, newest, recent, free) -> None:
    b, h, n = totals.shape
    if stamp.shape != (b, h, n) or stamp.dtype != torch.int32:
        raise ValueError(f"stamp must be int32 [B, H, N] = {(b, h, n)} (got {stamp.dtype} {tuple(stamp.shape)})")
    if newest.shape != (1,) or newest.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"newest must be an int32/int64 tensor of one element (got {newest.dtype} {tuple(newest.shape)})")
    if recent.shape != (b,) or recent.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"recent must be int32/int64 [B] = [{b}] (got {recent.dtype} {tuple(recent.shape)})")
    if free.shape != (b, h) or free.dtype != torch.int64:
        raise ValueError(f"free must be int64 [B, H] = {(b, h)} (got {free.dtype} {tuple(free.shape)})")


def kernel_takes(device, impl: str, tensors, d: int) -> bool:
    """Whether the Triton path runs: Triton wanted here, a head dim it takes, unit last strides
    and contiguous slot arrays (the kernel indexes totals, stamps and real by slot)."""
    if not use_triton(device, impl) or d not in HEAD_DIMS:
        return False
    return all(t.stride(-1) == 1 for t in tensors)


def attention_mass(query, keys, lengths, real, lse, totals, scaling: float, impl: str = "auto") -> None:
    """totals [B, Hkv, N] (float32) += this step's attention probability of each visible slot
    (slot < lengths[-1] and real [B, N] or [B, Hkv, N]), averaged over the query heads of each
    KV head. query [B, Hq, 1, D]; keys [B, Hkv, N, D]; lse [B, Hq, 1] float32, the natural
    log-sum-exp of scaling * q . k over the same visible slots (decode_attention(...,
    return_lse=True)); lengths int32 on the device (nothing syncs: a CUDA graph captures it)."""
    check_mass(query, keys, lengths, real, lse, totals)
    if impl == "auto":
        from . import ops

        if ops.tracing():  # torch.compile: one custom op instead of a graph break
            return attention_mass_op(query, keys, lengths, real, lse, totals, float(scaling))
    if not kernel_takes(keys.device, impl, (query, keys, real, lse, totals), keys.shape[-1]):
        return attention_mass_reference(query, keys, lengths, real, lse, totals, scaling)
    from ._triton_attention_mass import mass_and_choice_triton

    mass_and_choice_triton(query, keys, lengths, real, lse, totals, scaling)


def lowest_slot(totals, stamp, real, lengths, newest, recent, free, impl: str = "auto") -> None:
    """free [B, H] (int64) = per (row, head) the eligible slot of the lowest total, the lowest
    stamp among equal totals (slot 0 when none is eligible). Eligible: visible (as in
    attention_mass) and stamp [B, H, N] (int32) <= newest[0] - recent[b]."""
    b, h, n = totals.shape
    check_slots(totals, real, lengths, (b, h, n))
    check_choice(totals, stamp, newest, recent, free)
    if impl == "auto":
        from . import ops

        if ops.tracing():
            return lowest_slot_op(totals, stamp, real, lengths, newest, recent, free)
    if not kernel_takes(totals.device, impl, (totals, stamp, real), 16):
        return lowest_slot_reference(totals, stamp, real, lengths, newest, recent, free)
    from ._triton_attention_mass import mass_and_choice_triton

    mass_and_choice_triton(None, None, lengths, real, None, totals, 1.0, choice=(stamp, newest, recent, free))


def attention_mass_and_lowest_slot(query, keys, lengths, real, lse, totals, stamp, newest, recent, free,
                                   scaling: float, impl: str = "auto") -> None:
    """attention_mass(...) then lowest_slot(...) on the new totals: on the kernel path one pass
    over the slots and a small merge launch (H2O's whole step after its attention)."""
    check_mass(query, keys, lengths, real, lse, totals)
    check_choice(totals, stamp, newest, recent, free)
    if impl == "auto":
        from . import ops

        if ops.tracing():
            return attention_mass_and_lowest_slot_op(query, keys, lengths, real, lse, totals, stamp, newest, recent,
                                                     free, float(scaling))
    if not kernel_takes(keys.device, impl, (query, keys, real, lse, totals, stamp), keys.shape[-1]):
        attention_mass_reference(query, keys, lengths, real, lse, totals, scaling)
        return lowest_slot_reference(totals, stamp, real, lengths, newest, recent, free)
    from ._triton_attention_mass import mass_and_choice_triton

    mass_and_choice_triton(query, keys, lengths, real, lse, totals, scaling, choice=(stamp, newest, recent, free))


def attention_mass_from_scores_reference(scores, lengths, real, lse, totals, stamp, newest, recent, free) -> None:
    b, hkv, n = totals.shape
    r = scores.shape[1] // hkv
    visible = visible_slots(real, lengths, n)[:, :, None, :]  # [B, 1 or H, 1, N]
    lse = lse[:, :, 0].float().reshape(b, hkv, r, 1)
    s = scores.float().reshape(b, hkv, r, n)
    p = torch.exp(s - lse).masked_fill(~(visible & torch.isfinite(lse)), 0.0).nan_to_num(0.0)
    totals += p.sum(dim=2) / r
    lowest_slot_reference(totals, stamp, real, lengths, newest, recent, free)


def attention_mass_from_scores(scores, lengths, real, lse, totals, stamp, newest, recent, free,
                               impl: str = "auto") -> None:
    """attention_mass_and_lowest_slot from the scores the decode attention wrote instead of the
    keys: scores float32 [B, Hq, N], scale * q . k of each slot (decode_attention(...,
    scores_out=...), natural units; only visible slots are read), lse [B, Hq, 1] of the same
    attention. Per slot R x 4 bytes are read where the key pass read D x 2 (at GQA 4, d 128:
    16 bytes instead of 256)."""
    b, hkv, n = totals.shape
    if scores.dim() != 3 or scores.shape[0] != b or scores.shape[2] != n or scores.shape[1] % hkv \
            or scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 [B, k * Hkv, N] with B, Hkv, N = {b}, {hkv}, {n} "
                         f"(got {scores.dtype} {tuple(scores.shape)})")
    if lse.shape != (b, scores.shape[1], 1):
        raise ValueError(f"lse must be [B, Hq, 1] = {(b, scores.shape[1], 1)} (got {tuple(lse.shape)})")
    check_slots(totals, real, lengths, (b, hkv, n))
    check_choice(totals, stamp, newest, recent, free)
    if impl == "auto":
        from . import ops

        if ops.tracing():
            return attention_mass_from_scores_op(scores, lengths, real, lse, totals, stamp, newest, recent, free)
    if not kernel_takes(totals.device, impl, (scores, real, lse, totals, stamp), 16):
        return attention_mass_from_scores_reference(scores, lengths, real, lse, totals, stamp, newest, recent, free)
    from ._triton_attention_mass import scores_mass_and_choice_triton

    scores_mass_and_choice_triton(scores, lengths, real, lse, totals, stamp, newest, recent, free)


# -- custom ops (kernels/ops.py's pattern: the wrappers emit them only while dynamo traces; the
# op's body is the wrapper's eager path)
@mutating_op("zipkv::attention_mass", ("totals",))
def attention_mass_op(query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, real: torch.Tensor,
                      lse: torch.Tensor, totals: torch.Tensor, scaling: float) -> None:
    attention_mass(query, keys, lengths, real, lse, totals, scaling)


@mutating_op("zipkv::lowest_slot", ("free",))
def lowest_slot_op(totals: torch.Tensor, stamp: torch.Tensor, real: torch.Tensor, lengths: torch.Tensor,
                   newest: torch.Tensor, recent: torch.Tensor, free: torch.Tensor) -> None:
    lowest_slot(totals, stamp, real, lengths, newest, recent, free)


@mutating_op("zipkv::attention_mass_and_lowest_slot", ("totals", "free"))
def attention_mass_and_lowest_slot_op(query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor,
                                      real: torch.Tensor, lse: torch.Tensor, totals: torch.Tensor,
                                      stamp: torch.Tensor, newest: torch.Tensor, recent: torch.Tensor,
                                      free: torch.Tensor, scaling: float) -> None:
    attention_mass_and_lowest_slot(query, keys, lengths, real, lse, totals, stamp, newest, recent, free, scaling)


@mutating_op("zipkv::attention_mass_from_scores", ("totals", "free"))
def attention_mass_from_scores_op(scores: torch.Tensor, lengths: torch.Tensor, real: torch.Tensor, lse: torch.Tensor,
                                  totals: torch.Tensor, stamp: torch.Tensor, newest: torch.Tensor,
                                  recent: torch.Tensor, free: torch.Tensor) -> None:
    attention_mass_from_scores(scores, lengths, real, lse, totals, stamp, newest, recent, free)


__all__ = ["attention_mass", "attention_mass_and_lowest_slot", "attention_mass_from_scores",
           "attention_mass_from_scores_op", "attention_mass_from_scores_reference", "attention_mass_and_lowest_slot_op",
           "attention_mass_op", "attention_mass_reference", "lowest_slot", "lowest_slot_op",
           "lowest_slot_reference", "mutating_op", "visible_slots"]
