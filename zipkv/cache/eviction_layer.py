"""`EvictingLayer`: one layer of a cache that drops tokens for real.

Storage: `parts`, the compressed tokens (an `Fp16Store` and/or `PackedStore`s, e.g.
[low-bit | high-bit] for ZipVL), then `recent`, the tokens appended since the last
compression, as a plain [B, H, r, D] block with their padding flags. Attention sees
[parts (each right-aligned, holes first) | recent]: per (row, head), the held tokens in
logical order behind a left padding that exists only in that transient rectangle.

Lengths: `get_seq_length()` is the LOGICAL length, every token ever appended, so rotary
positions of new tokens (transformers derives them from it when position_ids is not given,
and generate() slices its inputs with it) continue where the sequence really is.
`get_mask_sizes()` gives the PHYSICAL length: kv_length = held slots + new tokens, with
kv_offset = logical - held, so the model's mask puts the new tokens in its last columns and
reads their padding from the right place of the (logically long) 2-D attention mask. The
held part of the mask comes from the layer itself (`attention_mask`), because what each
layer, row and head still holds differs.

Policy (what to score, when to drop) lives in `zipkv/policies/`; the layer hands it the
queries after every forward through `observe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from .layer_base import ZipkvLayer, query_length_of, storage_dtype, to_store_dtype

from ..attention import forget, hand_queries_to
from ..kernels.attention_lse import causal_attention_lse
from .stats import tensor_bytes


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, ...] -> [B, Hkv * groups, ...], query head h reading KV head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def masked_attention(query, key, value, mask, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """SDPA of query [B, Hq, q, D] over key / value [B, Hkv, K, D] under a bool mask [B, 1 or
    Hkv, q, K] (any held layout, padding, per-head budgets), K / V read as held (enable_gqa).
    Repeating them per query head (the reference, repeated_masked_attention) copied the whole
    cache `groups` times every decode step: 5.35 ms against 0.29 ms at 8 x 32K on an H200
    (experiments/sdpa_folded_decode.py). A per-KV-head mask is repeated instead (1 byte a token
    and head against K / V's 2 x D x 2)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and mask.shape[1] > 1:
        mask = repeat_heads(mask, groups)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout,
                                          enable_gqa=groups > 1)


def repeated_masked_attention(query, key, value, mask, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """masked_attention's reference: K / V (and a per-head mask) repeated per query head."""
    groups = query.shape[1] // key.shape[1]
    return F.scaled_dot_product_attention(
        query, repeat_heads(key, groups), repeat_heads(value, groups),
        attn_mask=repeat_heads(mask, groups) if mask.shape[1] > 1 else mask, scale=scaling, dropout_p=dropout)


def causal_prefill_attention(query, key, value, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """masked_attention for a prompt of q == K real tokens under the causal mask, without the
    mask (is_causal) and without repeating K / V (enable_gqa): the fast path of attend()."""
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, dropout_p=dropout,
                                          enable_gqa=query.shape[1] != key.shape[1])


class EvictingLayer(ZipkvLayer):

    def __init__(self, policy, layer_idx: int, keep_model_dtype: bool = False):
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        self.keep_model_dtype = keep_model_dtype
        self.owner = None  # the cache, told after each update (peak-memory tracking)
        self.memo = None  # while built from a recorded prefill: that record's shared results
        self.prefill_selection = None  # ZipVL sparse prefill: the selection, from before attention to after
        self.sparse_prefill_record = None  # SparsePrefillRecord of the sparse prompt forward
        self.prompt_lse = None  # float32 [B, Hq, T]: the prompt attention's log-sum-exp, during observe
        self.parts: list = []
        self.recent_keys = self.recent_values = self.recent_real = None
        self.recent_unpadded = True  # known on the host: recent_real is all True (no device read)
        # per recent token: summed attention of later queries [B, H, r] and how many saw it [B, 1, r]
        self.recent_score_sum = self.recent_score_count = None
        self.budget_rows = None  # int64 [B]: tokens each sequence keeps (continuous policies)
        self.logical_length = 0
        self.forwards = 0
        self.awaiting_queries = False
        self._held = None  # (keys, values) in storage dtype during one forward
        self._parts_valid = None
        self._mask = None
        self._mask_q = None  # new tokens of the current forward (forward_mask's width)

    # -- transformers layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        # Like ZipCache: kept tokens are fp16 for fp32 models (bf16 for bf16 ones), unless
        # the cache is lossless by design (full / recording).
        self.store_dtype = storage_dtype(self.dtype, self.keep_model_dtype)
        b, h, _, d = key_states.shape
        self.batch_size, self.num_heads, self.head_dim = b, h, d
        self.recent_keys = key_states.new_zeros(b, h, 0, d, dtype=self.store_dtype)
        self.recent_values = value_states.new_zeros(b, h, 0, d, dtype=self.store_dtype)
        self.recent_real = torch.ones(b, 0, dtype=torch.bool, device=self.device)
        if self.policy.tracks_recent:
            self.recent_score_sum = torch.zeros(b, h, 0, dtype=torch.float32, device=self.device)
            self.recent_score_count = torch.zeros(b, 1, 0, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.begin_update(key_states, value_states)
        n, b = key_states.shape[2], key_states.shape[0]
        # Detached at the door: eviction and quantization are not differentiable, and a held
        # tensor that requires grad would keep the forward's whole autograd graph alive.
        stored = to_store_dtype(key_states.detach(), self.store_dtype, "key_states", self.layer_idx)
        self.recent_keys = torch.cat([self.recent_keys, stored], dim=2)
        stored = to_store_dtype(value_states.detach(), self.store_dtype, "value_states", self.layer_idx)
        self.recent_values = torch.cat([self.recent_values, stored], dim=2)
        self.recent_real = torch.cat([self.recent_real, self.recent_real.new_ones(b, n)], dim=1)
        if self.policy.tracks_recent:
            self.recent_score_sum = torch.cat([self.recent_score_sum, self.recent_score_sum.new_zeros(b, self.num_heads, n)], 2)
            self.recent_score_count = torch.cat([self.recent_score_count, self.recent_score_count.new_zeros(b, 1, n)], 2)
        self.logical_length += n
        keys, values = self._held_layout()
        self._held = (keys, values)  # storage dtype: what policies score and keep
        if self.owner is not None:
            self.owner.note_bytes()
        self.awaiting_queries = True
        hand_queries_to(self)
        if self.store_dtype == self.dtype and not key_states.requires_grad:
            return keys, values
        # attention reads the held tokens as stored, but this forward's own tokens exactly as
        # the model made them: a prefill then attends exactly, as every eviction paper assumes
        # (and, with grad enabled, differentiably: only what is held is detached)
        old_keys, old_values = keys[:, :, :-n].to(self.dtype), values[:, :, :-n].to(self.dtype)
        return torch.cat([old_keys, key_states], dim=2), torch.cat([old_values, value_states], dim=2)

    def _held_layout(self):
        keys, values, valid = [], [], []
        for part in self.parts:
            k, v, ok = part.padded(self.store_dtype)
            if ok.shape[-1]:
                keys.append(k), values.append(v), valid.append(ok)
        self._parts_valid = torch.cat(valid, dim=2) if valid else None
        if not keys:
            return self.recent_keys, self.recent_values
        return torch.cat(keys + [self.recent_keys], dim=2), torch.cat(values + [self.recent_values], dim=2)

    @property
    def held_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [B, H, K, D] held during the current forward, in the storage dtype
        (the held tokens then this forward's): what a policy scores and keeps."""
        if self._held is None:
            raise RuntimeError(f"layer {self.layer_idx}: held_states exist only between update() and observe()")
        return self._held

    @property
    def forward_mask(self) -> torch.Tensor:
        """bool [B, 1 or H, q, K]: the mask of this forward's attention (built on first use)."""
        if self._mask is None:
            if self._mask_q is None:
                raise RuntimeError(f"layer {self.layer_idx}: forward_mask exists only between attention and observe()")
            self._mask = self._build_mask(self._mask_q)
        return self._mask

    def held_valid(self) -> torch.Tensor:
        """bool [B, H, K]: which slots of the held layout (this forward's keys) are real."""
        recent = self.recent_real[:, None, :].expand(-1, self.num_heads, -1)
        if self._parts_valid is None:
            return recent
        return torch.cat([self._parts_valid, recent], dim=2)

    def physical_length(self) -> int:
        """Slots attention reads for the held tokens (the widest run of each part + recent)."""
        if not self.is_initialized:
            return 0
        return sum(part.width for part in self.parts) + self.recent_keys.shape[2]

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        query_length = query_length_of(query_length)
        held = self.physical_length()
        return held + query_length, self.logical_length - held

    def reset(self) -> None:
        owner = self.owner
        self.__init__(self.policy, self.layer_idx, self.keep_model_dtype)
        self.owner = owner

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("evicting caches cannot be cropped (dropped tokens are gone)")

    def _select_batch(self, index):
        if not self.is_initialized:
            return
        index = index.to(self.device)
        for part in self.parts:
            part.select_batch(index)
        for name in ("recent_keys", "recent_values", "recent_real", "recent_score_sum", "recent_score_count",
                     "budget_rows"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index))
        self.batch_size = int(index.numel())

    def batch_rows(self) -> int:
        return self.batch_size

    def missing_attention_error(self) -> RuntimeError:
        return RuntimeError(
            f"zipkv attention never ran for layer {self.layer_idx}: the model does not use the "
            "'zipkv' attention implementation, so this evicting cache cannot mask or score its tokens. "
            "Build the cache with the model's own config object (it switches it) or call "
            "zipkv.enable_zipkv_attention(model)."
        )

    # -- what the attention function asks and hands over ---------------------------------------
    def note_new_tokens(self, incoming, q_len: int, new_real: torch.Tensor | None = None) -> None:
        """This forward's q_len new tokens' padding, read from the model's mask (its last q
        columns are the new tokens, see get_mask_sizes) or given as new_real [B, q]. The mask
        itself (forward_mask) is built only if something reads it: a causal unpadded prompt
        attends without one, and at 32K it is a 1 GiB bool tensor (5 ms a layer on the H200)."""
        if new_real is not None or isinstance(incoming, torch.Tensor):  # else no padding: the ones stay
            self.recent_unpadded = False  # padding possible: read recent_real when it matters
            if new_real is None:
                new_real = _new_token_padding(incoming, q_len, self.batch_size, self.device)
            self.recent_real[:, -q_len:] = new_real.to(self.device)
        self._mask, self._mask_q = None, q_len

    def _build_mask(self, q_len: int) -> torch.Tensor:
        """Held slots: the layer's own validity; new tokens: causal among themselves, with
        their padding."""
        old = self.held_valid()[..., :-q_len]
        # one mask row for every head when they agree: a prompt's mask is q x K, worth a device
        # read to shrink; a decode step's is one row a head, cheaper kept than read
        if q_len > 1 and bool((old == old[:, :1]).all()):
            old = old[:, :1]
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=self.device).tril()
        new = causal[None, None] & self.recent_real[:, None, None, -q_len:]
        heads = old.shape[1]
        return torch.cat([old[:, :, None, :].expand(-1, -1, q_len, -1), new.expand(-1, heads, -1, -1)], dim=-1)

    def attend(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        """zipkv attention for this layer. After eviction the layer holds different tokens per
        layer, row and even head (AdaKV), which the model's one 4-D mask (sized by the first
        layer) cannot describe: the mask comes from what this layer holds, only the new
        tokens' padding from the model's mask. SDPA gives the output (this forward attends
        before anything is dropped, so a prefill is exact), then the policy scores and evicts."""
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        self.note_new_tokens(attention_mask, query.shape[2])
        if self.forwards == 0 and self.policy.sparse_prefill:
            output = self._sparse_prefill(query, key, value, scaling)
            self.observe(query, scaling)
            return output.transpose(1, 2).contiguous(), None
        dropout = dropout if module.training else 0.0
        if key.shape[2] == query.shape[2] and (self.recent_unpadded or bool(self.recent_real.all())):
            # a prompt with nothing held before it and no padding: the mask is plain causal, so
            # SDPA may take its flash kernel (an explicit mask rules it out: the masked prefill
            # ran at 2.3x the plain one at 32K on the H200), GQA without copying K / V 4x
            output = self._causal_prefill(query, key, value, scaling, dropout)
        else:
            output = masked_attention(query, key, value, self.forward_mask, scaling, dropout)
        try:
            self.observe(query, scaling)
        finally:
            self.prompt_lse = None
        return output.transpose(1, 2).contiguous(), None

    def _causal_prefill(self, query, key, value, scaling, dropout):
        """causal_prefill_attention; for a policy that reads the prompt's softmax normalizers
        (H2O's totals), the same fused op's log-sum-exp kept in `prompt_lse` for observe (on
        CUDA, where SDPA's own choice returns it: the totals then take one pass over QK^T)."""
        if getattr(self.policy, "wants_prompt_lse", False) and dropout == 0.0:
            fused = causal_attention_lse(query, key, value, scaling)
            if fused is not None:
                output, self.prompt_lse = fused
                return output
        return causal_prefill_attention(query, key, value, scaling, dropout)

    def _sparse_prefill(self, query, key, value, scaling) -> torch.Tensor:
        """ZipVL sparse prefill of the prompt (the layer's first forward): the policy selects
        the important set T of each row from the probe queries BEFORE attention, then
        attention is computed only for the query rows in T over the keys in T, causal:
        O = Attn(Q[T], K[T], V[T]). Rows not in T get an output of exactly zero (their
        attention is skipped; their hidden states still go through the residual and the MLP).
        Rows of a left-padded batch keep different counts: their index lists are padded at
        the end, which the kept-order causal mask hides from every real row
        (kernels.sparse_prefill.sparse_prefill_scatter). Returns [B, Hq, q, D]."""
        from ..kernels.sparse_prefill import pad_keep_indices, sparse_prefill_scatter

        if key.shape[2] != query.shape[2]:
            raise RuntimeError("sparse prefill runs on a layer's first forward, which holds no earlier tokens")
        important = self.policy.sparse_prefill_plan(self, query.detach(), scaling)  # bool [B, q]
        keep_idx, counts = pad_keep_indices(important)
        output = sparse_prefill_scatter(query, key, value, keep_idx, counts, scale=scaling)
        probes = len(self.prefill_selection.positions) if self.prefill_selection is not None else 0
        self.sparse_prefill_record = SparsePrefillRecord(
            layer_idx=self.layer_idx, kept=counts.tolist(), real=self.recent_real.sum(1).tolist(),
            query_heads=query.shape[1], head_dim=query.shape[3], width=query.shape[2], probes=probes,
            important=important)
        return output

    def observe(self, query: torch.Tensor, scaling: float) -> None:
        """After attention: the policy scores with the queries and evicts what is due."""
        self.awaiting_queries = False
        first = self.forwards == 0
        self.forwards += 1
        try:  # policies keep query-derived scores (and a recording one the queries): detached
            self.policy.after_forward(self, query.detach(), scaling, first)
        finally:
            self._held = self._mask = self._mask_q = self._parts_valid = None

    def ingest(self, keys, values, query, real, scaling: float) -> None:
        """Feed one forward's states recorded elsewhere (keys/values [B, H, q, D] after RoPE,
        query [B, Hq, q, D], real [B, q] padding flags): the same path as a live forward, minus
        computing the attention output."""
        if self.policy.sparse_prefill:
            raise ValueError(
                "sparse prefill changes the prompt forward itself (rows outside the important set get no "
                "attention), so it cannot be built from states recorded by a dense prefill: run the model "
                "on the prompt with this cache instead"
            )
        self.update(keys, values)
        forget(self)
        self.note_new_tokens(None, keys.shape[2], new_real=real.to(torch.bool))
        self.observe(query, scaling)

    # -- what policies do to the storage ----------------------------------------------------------
    def replace_all(self, parts: list) -> None:
        """Everything held (parts and recent) becomes `parts`; recent is emptied."""
        self.parts = [p for p in parts if p is not None]
        self._clear_recent()

    def _clear_recent(self) -> None:
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        self.recent_keys = self.recent_keys.new_zeros(b, h, 0, d)
        self.recent_values = self.recent_values.new_zeros(b, h, 0, d)
        self.recent_real = self.recent_real.new_ones(b, 0)
        self.recent_unpadded = True
        if self.policy.tracks_recent:
            self.recent_score_sum = self.recent_score_sum.new_zeros(b, h, 0)
            self.recent_score_count = self.recent_score_count.new_zeros(b, 1, 0)

    # -- accounting -------------------------------------------------------------------------
    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer keeps between forwards (what stats() counts)."""
        if not self.is_initialized:
            return []
        own = [self.recent_keys, self.recent_values, self.recent_real, self.recent_score_sum,
               self.recent_score_count, self.budget_rows]
        return [t for t in own if t is not None] + [t for part in self.parts for t in part.tensors()]

    def nbytes(self) -> int:
        return tensor_bytes(self.held_tensors())

    def kept_token_heads(self) -> int:
        """(token, KV head) pairs held, per the whole batch: real tokens only."""
        if not self.is_initialized:
            return 0
        held = sum(int(part.lengths.sum()) for part in self.parts)
        return held + int(self.recent_real.sum()) * self.num_heads

    def token_bytes(self) -> int:
        """Bytes of the kept tokens' storage (codes + quantization parameters, or fp16 keys and
        values), without layout offsets and scoring bookkeeping."""
        if not self.is_initialized:
            return 0
        return sum(part.token_bytes() for part in self.parts) + tensor_bytes([self.recent_keys, self.recent_values])


@dataclass
class SparsePrefillRecord:
    """What one layer's sparse prefill did. Attention FLOPs count the two matrix products
    (Q K^T and P V, 2 FLOPs per multiply-add, softmax left out) of causal attention: a row of
    n tokens costs 2 * Hq * D * n * (n + 1) (query i sees i keys, 4 * D FLOPs each per head).
    dense: over each row's real tokens; sparse: over its kept tokens (the batched path also
    computes the end padding up to the longest row, whose outputs are thrown away; not
    counted); probe: the probe queries against every key (Q K^T only, 2 * Hq * D * P * S
    per row), which ZipVL computes with or without sparse prefill."""

    layer_idx: int
    kept: list  # kept (important) tokens per row
    real: list  # real (not padding) prompt tokens per row
    query_heads: int
    head_dim: int
    width: int  # prompt length incl. padding
    probes: int
    important: torch.Tensor = field(repr=False, default=None)  # bool [B, S]: the rows' important sets

    @staticmethod
    def causal_flops(n: int, heads: int, head_dim: int) -> int:
        return 2 * heads * head_dim * n * (n + 1)

    @property
    def kept_fraction(self) -> float:
        total = sum(self.real)
        return sum(self.kept) / total if total else 1.0

    @property
    def dense_flops(self) -> int:
        return sum(self.causal_flops(n, self.query_heads, self.head_dim) for n in self.real)

    @property
    def sparse_flops(self) -> int:
        return sum(self.causal_flops(n, self.query_heads, self.head_dim) for n in self.kept)

    @property
    def probe_flops(self) -> int:
        return 2 * self.query_heads * self.head_dim * self.probes * self.width * len(self.real)

    def to_dict(self) -> dict:
        return dict(layer_idx=self.layer_idx, kept=self.kept, real=self.real, kept_fraction=self.kept_fraction,
                    dense_flops=self.dense_flops, sparse_flops=self.sparse_flops, probe_flops=self.probe_flops)


def _new_token_padding(incoming, q_len: int, batch: int, device) -> torch.Tensor:
    """bool [B, q]: real (not padding) flags of the new tokens, from the model's 4-D mask: the
    last query row (a real token under left padding) sees every real new token."""
    if incoming.dim() != 4:  # (note_new_tokens calls it with a tensor only)
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    row = incoming[:, 0, -1, -q_len:]
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(batch, -1).to(device)


__all__ = ["EvictingLayer", "SparsePrefillRecord"]
