"""`StaticEvictingLayer`: an evicting layer's kept tokens in one preallocated buffer, so one
decode step is a fixed sequence of kernels that a CUDA graph can capture (zipkv.graph_decode).

After the prompt an `EvictingLayer` holds, per (row, KV head), the tokens its policy kept. The
static form puts them in one buffer `[B, H, N, D]` (the storage dtype, as the eager store), each
row right-aligned with its holes first (as `Fp16Store.padded()` lays them out), and a bool
`pad_mask [B, N]` hides the holes of rows that keep fewer tokens (left-padded batch rows). A step
writes the new token, then attends with `decode_attention(query, [], buffer, mask=pad_mask,
lengths=lengths)`: the decode kernel reads the valid count on the device. Attention is
permutation-invariant over keys once RoPE is applied, so where a token sits does not matter.

Where the new token goes is the policy's part, a small slot rule (`slots`):
- `AppendSlots` (snapkv, pyramidkv, cake, defensive_kv, key_norm, full: nothing is evicted
  after the prompt): at `lengths[0]`, which advances on the device (window_append).
- `RingSlots` (streaming_llm: sinks + the most recent): the buffer holds each row's budget plus
  one free slot; the new token takes the free slot and, once attended, the oldest non-sink token
  is the evicted one, whose slot is the next free one: a ring over the non-sink slots, the slot
  index computed on the device from a step counter.
- `HeavyHitterSlots` (h2o): like the ring, but the next free slot (per row and head) is the
  argmin of the accumulated attention over the slots outside the budget // 2 most recent, as
  the eager policy evicts it (ties: the oldest goes).
Nothing is ever flushed between steps (`flush_due()` is False): the step is all there is.

Per-head budgets (adakv): the kept tokens are right-aligned per (row, head) and `pad_mask` is
per head, [B, H, N] (the decode kernel takes a bool mask per KV head; AppendSlots as for snapkv).
Tiered methods (packed parts) have their own static form (static_tiered_layer.py).
"""

from __future__ import annotations

import torch

from ..attention import UNSUPPORTED_KWARGS as ATTENTION_UNSUPPORTED, hand_queries_to
from ..kernels.attention_mass import attention_mass_from_scores
from ..kernels.decode_attention import decode_attention
from ..kernels.window_step import window_append, write_slots
from .backref import BackReference
from .eviction_layer import EvictingLayer
from ..policies import ContinuousPolicy, KeepPolicy, SelectPolicy, TieredPolicy
from .layer_base import ZipkvLayer
from .static_base import StaticLayerBase, check_holds_prompt
from .stats import tensor_bytes

# attention kwargs this layer cannot honour (an error, never dropped): those no zipkv path
# honours (refused at the entry point, zipkv.attention), and a window, which it has none of
UNSUPPORTED_KWARGS = ATTENTION_UNSUPPORTED + ("sliding_window",)


def static_slot_rule(layer: EvictingLayer, method: str):
    """The slot rule of a layer's static form (below; None for a tiered layer, which has its own
    class: static_tiered_layer.py), or a ValueError naming `method` when it has none; also
    checks the layer holds a prompt and is not mid-forward."""
    policy = layer.policy
    check_holds_prompt(layer)
    if isinstance(policy, (KeepPolicy, SelectPolicy)):
        return AppendSlots
    if isinstance(policy, ContinuousPolicy):
        return RingSlots if policy.kind == "streaming_llm" else HeavyHitterSlots
    if isinstance(policy, TieredPolicy):
        from .static_tiered_layer import check_tiered  # it builds on this module

        check_tiered(layer, method)
        return None
    raise ValueError(f"method {method!r} has no static (CUDA-graph) form: {type(policy).__name__} has none; "
                     "decode it eagerly (model.generate)")


def static_evicting_layer(layer: EvictingLayer, method: str, extra_tokens: int) -> "StaticEvictingLayer":
    """The static form of an eager evicting layer that holds a prompt, with room for
    `extra_tokens` more tokens, or a ValueError naming `method` when it has none."""
    rule = static_slot_rule(layer, method)
    if rule is None:
        from .static_tiered_layer import StaticTieredLayer

        return StaticTieredLayer(layer, method, extra_tokens)
    return StaticEvictingLayer(layer, rule, method, extra_tokens)


def check_static_kwargs(kwargs: dict) -> None:
    """Attention arguments a static evicting layer cannot honour: an error, never dropped."""
    given = sorted(name for name in UNSUPPORTED_KWARGS if kwargs.get(name) is not None)
    if given:
        raise ValueError(f"a static evicting cache cannot honour the attention arguments {given}")


def held_rectangle(layer: EvictingLayer, method: str):
    """(keys, values [B, H, w, D], real, extras {name: [B, H, w]}) of everything the eager layer
    holds, each (row, head) right-aligned with its holes first; real is [B, w] when every KV
    head of a row holds the same tokens' slots, else [B, H, w] (per-head budgets: AdaKV)."""
    keys, values, valid, extras = [], [], [], {}
    for part in layer.parts:
        if getattr(part, "bits", None) != 16:
            raise ValueError(f"method {method!r}: only fp16 kept tokens have a static form (got {part.bits}-bit)")
        k, v, ok = part.padded(layer.store_dtype)
        keys.append(k), values.append(v), valid.append(ok)
        extras.update({name: part.padded_extra(name) for name in part.extras})
    b, h = layer.batch_size, layer.num_heads
    keys.append(layer.recent_keys), values.append(layer.recent_values)
    valid.append(layer.recent_real[:, None, :].expand(b, h, -1))
    valid = torch.cat(valid, dim=2)
    if extras and layer.recent_keys.shape[2]:
        raise ValueError(f"method {method!r}: tokens with per-token scores wait in the recent part")
    real = valid[:, 0] if bool((valid == valid[:, :1]).all()) else valid
    return torch.cat(keys, dim=2), torch.cat(values, dim=2), real, extras


def row_mask(real: torch.Tensor, method: str) -> torch.Tensor:
    """real [B, w] as it is; a per-head one [B, H, w] is a ValueError naming `method` (the ring
    and heavy-hitter slots keep one layout per row: their policies' budgets are per row)."""
    if real.dim() != 2:
        raise ValueError(f"method {method!r}: the KV heads of a row hold different token counts, which its "
                         "static slot rule does not take")
    return real


class StaticEvictingLayer(StaticLayerBase, ZipkvLayer):
    """The static form of an `EvictingLayer` (module docstring). Built by
    `static_evicting_layer()`; follows the static-layer protocol of zipkv.graph_decode."""

    def __init__(self, layer: EvictingLayer, rule, method: str, extra_tokens: int):
        self.adopt(layer, method)
        keys, values, real, extras = held_rectangle(layer, method)
        self.lengths = torch.zeros(1, dtype=torch.int32, device=self.device)
        # the slot rule sizes the buffers (room to append, or one free slot) and fills them
        self.slots = rule(self, layer, keys, values, real, extras, extra_tokens)
        self.padded = not bool(self.pad_mask.all())

    def adopt(self, layer: EvictingLayer, method: str) -> None:
        """The eager layer's identity, shapes and lengths (what every static form starts from)."""
        ZipkvLayer.__init__(self)
        self.layer_idx, self.method, self.owner = layer.layer_idx, method, layer.owner
        self.dtype, self.device, self.store_dtype = layer.dtype, layer.device, layer.store_dtype
        self.batch_size, self.num_heads, self.head_dim = layer.batch_size, layer.num_heads, layer.head_dim
        self.logical_length = layer.logical_length
        self.is_initialized, self.awaiting_queries = True, False
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

    def allocate(self, keys, values, real, slots: int) -> None:
        """Buffers of `slots` tokens with the held rectangle at their front (called by the slot
        rule); slots after it are real (they fill as tokens arrive, the count says which).
        pad_mask: [B, slots], or [B, H, slots] when `real` is per head."""
        b, h, w, d = keys.shape
        self.k_buf = keys.new_zeros(b, h, slots, d)
        self.v_buf = values.new_zeros(b, h, slots, d)
        self.k_buf[:, :, :w], self.v_buf[:, :, :w] = keys, values
        self.pad_mask = torch.ones(*real.shape[:-1], slots, dtype=torch.bool, device=self.device)
        self.pad_mask[..., :w] = real

    def head_mask(self) -> torch.Tensor:
        """bool [B, H, N]: pad_mask per KV head (a view)."""
        mask = self.pad_mask
        return mask if mask.dim() == 3 else mask[:, None, :].expand(-1, self.num_heads, -1)

    def lazy_initialization(self, key_states, value_states):
        raise RuntimeError("a static layer is built from a filled eager layer (to_static), never lazily")

    # -- one decode step (captured) ---------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[2] != 1:
            raise ValueError(f"a static (CUDA-graph) cache decodes one token per step (got {key_states.shape[2]})")
        if self.awaiting_queries:
            raise RuntimeError(f"zipkv attention never ran for layer {self.layer_idx}: a static evicting cache "
                               "needs the model to use the 'zipkv' attention implementation")
        # NaN/inf are recorded in nonfinite (raised by check_finite: a check now would stop the
        # graph). Detached: a buffer written in place from a tensor that requires grad would
        # join (and keep) the autograd graph.
        self.write(key_states.detach(), value_states.detach())
        self.awaiting_queries = True
        hand_queries_to(self)
        return key_states, value_states

    def write(self, keys, values) -> None:
        """The new token into the buffers (captured): where the slot rule says."""
        self.slots.write(keys, values)

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        check_static_kwargs(kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        mask = None
        if self.padded:  # per head [B, H, N] -> the kernel's [B, Hkv, Tq, N]
            mask = self.pad_mask if self.pad_mask.dim() == 2 else self.pad_mask[:, :, None, :]
        lse = scores = None
        if self.slots.needs_scores:  # a step's workspace (a graph's pool reuses it for every layer)
            b, hq = query.shape[:2]
            scores = torch.empty(b, hq, self.k_buf.shape[2], dtype=torch.float32, device=query.device)
        output = decode_attention(query, [], self.k_buf, self.v_buf, mask=mask, scale=scaling, lengths=self.lengths,
                                  return_lse=self.slots.needs_lse, scores_out=scores)
        if self.slots.needs_lse:
            output, lse = output
        self.slots.after_attention(query.detach(), scaling, lse, scores)
        self.awaiting_queries = False
        return output.transpose(1, 2).contiguous(), None

    # -- host side between steps ------------------------------------------------------------------
    def advance(self) -> None:
        """The host's mirror of one decoded token (the device counts advanced in the step)."""
        self.logical_length += 1
        self.slots.advance()

    def has_room(self) -> bool:
        """Whether one more step fits (a ring never fills)."""
        return self.slots.has_room()

    # -- the layer interface and the accounting EvictionCache.stats() reads -----------------------
    def get_seq_length(self) -> int:
        return self.logical_length  # every token ever appended, as the eager layer (positions)

    def decode_inputs(self):
        """(segments, fp16 buffer) the decode kernel reads: no packed tiers here."""
        return [], self.k_buf

    def held_tensors(self) -> list[torch.Tensor]:
        return [self.k_buf, self.v_buf, self.pad_mask, self.lengths, self.nonfinite] + self.slots.tensors()

    def nbytes(self) -> int:
        return tensor_bytes(self.held_tensors())

    def token_bytes(self) -> int:
        """The token buffers, their capacity included (what the device holds)."""
        return tensor_bytes([self.k_buf, self.v_buf])

    def held_slots(self) -> torch.Tensor:
        """bool [B, H, N]: the slots that hold a kept token between steps (not holes, not free
        slots, not slots past the count)."""
        return self.slots.held_slots()

    def kept_token_heads(self) -> int:
        return int(self.held_slots().sum())

    def batch_rows(self) -> int:
        return self.batch_size

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("evicting caches cannot be cropped (dropped tokens are gone)")



class SlotRule:
    """Where a step writes its token (`write`, captured), what it does after attention (captured)
    and the host's mirror (`advance`); `held_slots()` says which slots hold kept tokens. The
    defaults: nothing after attention, nothing on the host, never full, no tensors of its own.
    needs_lse: after_attention reads the attention's log-sum-exp per query head ([B, Hq, 1]);
    needs_scores: and its scaled scores of every slot ([B, Hq, N], decode_attention's scores_out)."""

    layer = BackReference()  # the layer holding this rule (it holds the rule: no reference cycle)
    needs_lse = False
    needs_scores = False

    def write(self, keys, values) -> None:
        raise NotImplementedError

    def held_slots(self) -> torch.Tensor:
        raise NotImplementedError

    def after_attention(self, query, scaling, lse, scores) -> None:
        pass

    def advance(self) -> None:
        pass

    def has_room(self) -> bool:
        return True

    def tensors(self) -> list[torch.Tensor]:
        return []


class AppendSlots(SlotRule):
    """Nothing is evicted after the prompt: the new token goes to slot lengths[0]."""

    def __init__(self, layer: StaticEvictingLayer, eager, keys, values, real, extras, extra_tokens: int):
        self.layer = layer
        self.filled, self.capacity = keys.shape[2], keys.shape[2] + extra_tokens
        layer.allocate(keys, values, real, self.capacity)
        layer.lengths.fill_(self.filled)

    def write(self, keys, values) -> None:
        # a host check, outside a compiled step (its changing count would recompile the step
        # every time): StaticDecoder.step() checks has_room() before it instead
        if not torch.compiler.is_compiling() and self.filled >= self.capacity:
            raise RuntimeError(f"layer {self.layer.layer_idx}: the static buffer of {self.capacity} tokens is full")
        layer = self.layer
        window_append(keys, values, layer.k_buf, layer.v_buf, layer.lengths, layer.nonfinite)
        layer.lengths += 1

    def advance(self) -> None:
        self.filled += 1

    def has_room(self) -> bool:
        return self.filled < self.capacity

    def held_slots(self) -> torch.Tensor:
        layer = self.layer
        filled = torch.arange(layer.k_buf.shape[2], device=layer.device) < self.filled
        return layer.head_mask() & filled


class RingSlots(SlotRule):
    """streaming_llm: row b holds its budget (sinks, then recent tokens in logical order, after
    its holes) plus one free slot at the end. Its non-sink slots [start_b, start_b + size_b)
    form a ring; at step t the new token takes ring position (size_b - 1 + t) % size_b, which
    holds the oldest non-sink token (the one the eager policy evicted after step t - 1)."""

    def __init__(self, layer: StaticEvictingLayer, eager, keys, values, real, extras, extra_tokens: int):
        self.layer = layer
        w = keys.shape[2]
        budgets = row_mask(real, layer.method).sum(dim=1).to(torch.int64)
        sinks = eager.policy.num_sinks
        if bool((budgets < sinks).any()):
            raise ValueError(f"method {layer.method!r}: every row must keep at least num_sinks={sinks} tokens for "
                             f"the static form (a row keeps {int(budgets.min())})")
        layer.allocate(keys, values, real, w + 1)
        layer.lengths.fill_(w + 1)  # every slot counts; holes are masked
        self.start = (w - budgets + sinks).to(layer.device)
        self.size = (budgets - sinks + 1).to(layer.device)
        self.step = torch.zeros(1, dtype=torch.int64, device=layer.device)

    def write(self, keys, values) -> None:
        layer = self.layer
        slot = self.start + (self.size - 1 + self.step) % self.size  # [B], on the device
        write_slots(keys, values, layer.k_buf, layer.v_buf, slot[:, None].expand(-1, layer.num_heads),
                    layer.nonfinite)
        self.step += 1

    def held_slots(self) -> torch.Tensor:
        # between steps the next free slot holds the evicted token: not held
        layer = self.layer
        free = self.start + (self.size - 1 + self.step) % self.size
        slots = torch.arange(layer.k_buf.shape[2], device=layer.device)
        return (layer.pad_mask & (slots[None, :] != free[:, None]))[:, None, :].expand(-1, layer.num_heads, -1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.start, self.size, self.step]


class HeavyHitterSlots(SlotRule):
    """h2o: each (row, head) holds its budget plus one free slot. Per slot, the attention it
    accumulated (`totals`, float32) and an arrival stamp (int32, its rank in logical order: the
    held prompt tokens their place in the rectangle, the t-th new token w + t; `newest` the
    stamp of the latest). After a step's attention the free slot of each (row, head) becomes
    the held token the eager policy evicts: the lowest total outside the budget // 2 most
    recent, the oldest among equals. Both after one attention: kernels/attention_mass.py (on
    CUDA one pass over the scores the attention wrote, with its log-sum-exp, and a small merge
    launch: 16 bytes a slot at GQA 4 instead of re-reading the 256-byte key)."""

    needs_lse = True
    needs_scores = True

    def __init__(self, layer: StaticEvictingLayer, eager, keys, values, real, extras, extra_tokens: int):
        self.layer = layer
        b, h, w, _ = keys.shape
        dev = layer.device
        budgets = row_mask(real, layer.method).sum(dim=1).to(torch.int64)
        layer.allocate(keys, values, real, w + 1)
        layer.lengths.fill_(w + 1)
        self.recent = (budgets // 2).to(dev)  # H2O's even split of the budget
        self.totals = torch.zeros(b, h, w + 1, dtype=torch.float32, device=dev)
        self.totals[:, :, :w] = extras["totals"].nan_to_num(neginf=0.0)
        self.stamp = torch.arange(w + 1, dtype=torch.int32, device=dev).expand(b, h, -1).contiguous()
        self.free = torch.full((b, h), w, dtype=torch.int64, device=dev)
        self.newest = torch.full((1,), w - 1, dtype=torch.int32, device=dev)

    def write(self, keys, values) -> None:
        layer = self.layer
        write_slots(keys, values, layer.k_buf, layer.v_buf, self.free, layer.nonfinite)
        self.newest += 1
        at = self.free[:, :, None]
        self.stamp.scatter_(2, at, self.newest.expand_as(at).contiguous())
        self.totals.scatter_(2, at, torch.zeros_like(at, dtype=torch.float32))

    def after_attention(self, query, scaling, lse, scores) -> None:
        # the eager policy's scores: this query's attention over the held tokens (the query
        # heads of a KV head averaged) added to the running totals, then the next free slot
        layer = self.layer
        attention_mass_from_scores(scores, layer.lengths, layer.pad_mask, lse, self.totals, self.stamp, self.newest,
                                   self.recent, self.free)

    def held_slots(self) -> torch.Tensor:
        layer = self.layer
        slots = torch.arange(layer.k_buf.shape[2], device=layer.device)
        return layer.pad_mask[:, None, :] & (slots[None, None, :] != self.free[:, :, None])

    def tensors(self) -> list[torch.Tensor]:
        return [self.recent, self.totals, self.stamp, self.free, self.newest]


__all__ = ["StaticEvictingLayer", "static_evicting_layer", "static_slot_rule"]
