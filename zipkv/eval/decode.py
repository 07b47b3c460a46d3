"""Feeding a model through a cache the way users do: context, then question, then greedy.

Every forward passes explicit position_ids, so a cache that drops tokens (or a press
that pruned it) never shifts the positions of what follows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..transformers_support import cache_kwargs
from .methods import Method

MODE_AFTER = "after"  # the question is a second forward on top of the cached context
MODE_INSIDE = "inside"  # context and question are prefilled together
MODES = (MODE_AFTER, MODE_INSIDE)


@dataclass
class Decoded:
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float
    tokens_seen: int  # everything that went through the cache
    cache: object = field(repr=False, default=None)


def _forward(model, method: Method, cache, ids: list[int], start: int, keep: int = 1) -> torch.Tensor:
    device = model.device
    input_ids = torch.tensor([ids], device=device)
    positions = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
    extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in method.forward_kwargs(start, len(ids)).items()}
    out = model(
        input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=keep, **cache_kwargs(cache), **extra
    )
    return out.logits[0].float()


def _stop_now(text: str, stop: tuple[str, ...]) -> bool:
    # A stop string only counts after the answer has started: models often open with "\n".
    body = text.lstrip()
    return bool(body) and any(s in body for s in stop)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    body = text.lstrip()
    for s in stop:
        if s in body:
            body = body[: body.index(s)]
    return body.strip()


@torch.inference_mode()
def greedy_answer(
    model, tokenizer, method: Method, context_ids: list[int], question_ids: list[int], *,
    max_new_tokens: int, stop: tuple[str, ...] = (), mode: str = MODE_AFTER, eos_ids: set[int] | None = None,
) -> Decoded:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cache = method.new_cache(model)
    t0 = time.perf_counter()
    if mode == MODE_AFTER:
        with method.prefill(model):
            _forward(model, method, cache, context_ids, 0)
        logits = _forward(model, method, cache, question_ids, len(context_ids))
    else:
        with method.prefill(model):
            logits = _forward(model, method, cache, context_ids + question_ids, 0)
    t1 = time.perf_counter()
    pos = len(context_ids) + len(question_ids)
    tokens: list[int] = []
    while True:
        token = int(logits[-1].argmax())
        tokens.append(token)
        if (eos_ids and token in eos_ids) or len(tokens) >= max_new_tokens:
            break
        if stop and _stop_now(tokenizer.decode(tokens, skip_special_tokens=True), stop):
            break
        logits = _forward(model, method, cache, [token], pos)
        pos += 1
    t2 = time.perf_counter()
    # the last token was produced but never fed: the cache has seen pos tokens
    return Decoded(tokens, t1 - t0, t2 - t1, pos, cache)


@dataclass
class Forced:
    log_probs: torch.Tensor  # [target, vocab], float32, next-token log-probabilities
    prefill_seconds: float
    decode_seconds: float
    tokens_seen: int
    cache: object = field(repr=False, default=None)


@torch.inference_mode()
def teacher_forced(model, method: Method, context_ids: list[int], target_ids: list[int]) -> Forced:
    """Prefill the context, then feed the target one token per forward, as decoding would."""
    cache = method.new_cache(model)
    t0 = time.perf_counter()
    with method.prefill(model):
        logits = _forward(model, method, cache, context_ids, 0)
    t1 = time.perf_counter()
    rows = [torch.log_softmax(logits[-1], -1)]
    for t, token in enumerate(target_ids[:-1]):
        logits = _forward(model, method, cache, [token], len(context_ids) + t)
        rows.append(torch.log_softmax(logits[-1], -1))
    t2 = time.perf_counter()
    return Forced(torch.stack(rows).cpu(), t1 - t0, t2 - t1, len(context_ids) + len(target_ids) - 1, cache)


@torch.inference_mode()
def reference_log_probs(model, context_ids: list[int], target_ids: list[int]) -> torch.Tensor:
    """The full-precision reference: one forward over context + target, no cache."""
    ids = torch.tensor([context_ids + target_ids], device=model.device)
    keep = len(target_ids) + 1
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).cpu()  # rows predict target[0..T-1]


def lm_metrics(log_probs: torch.Tensor, reference: torch.Tensor, target_ids: list[int]) -> dict[str, float]:
    """Perplexity, mean KL(reference || method) per token, top-1 agreement with the reference."""
    if log_probs.shape != reference.shape or log_probs.shape[0] != len(target_ids):
        raise ValueError(f"shapes differ: {tuple(log_probs.shape)} vs {tuple(reference.shape)} for {len(target_ids)} targets")
    target = torch.tensor(target_ids).unsqueeze(1)
    nll = -log_probs.gather(1, target).mean()
    ref_nll = -reference.gather(1, target).mean()
    kl = (reference.exp() * (reference - log_probs)).sum(-1).clamp_min(0).mean()
    top1 = (log_probs.argmax(-1) == reference.argmax(-1)).float().mean()
    return {
        "ppl": float(nll.exp()), "ref_ppl": float(ref_nll.exp()), "kl": float(kl), "top1_agreement": float(top1),
    }
