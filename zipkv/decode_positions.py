"""The position_ids buffer of a static decode step, multimodal rotary positions (M-RoPE) included.

Most models rotate by one position per token: a step's position_ids are [B, 1], the text
position. Qwen2-VL / Qwen2.5-VL rotate by three (temporal, height, width); an image's tokens
take 3-D grid positions, so after the prompt every row's three positions run ahead of (or
behind) its text position by the prompt's `rope_deltas`, which the model stores on itself at
the prompt's forward (`Qwen2VLModel.compute_3d_position_ids`, where the model's own decode
steps take text position + rope_deltas for each of the three; generate() does the same). A
1-D position would rotate every generated token as if the image were text.

The buffer is made once and advanced in place (`+= 1` per step), so a CUDA graph replays it.
"""

from __future__ import annotations

import torch

MROPE_AXES = 3  # temporal, height, width


def uses_mrope(model) -> bool:
    """Whether the language model of `model` rotates with M-RoPE (its rope settings name an
    mrope_section; transformers 5 calls them rope_parameters, older versions rope_scaling)."""
    text = model.config.get_text_config(decoder=True)
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(text, name, None)
        if not isinstance(params, dict):
            continue
        # flat, or one dict per layer type
        candidates = [params] + [value for value in params.values() if isinstance(value, dict)]
        if any(candidate.get("mrope_section") is not None for candidate in candidates):
            return True
    return False


def _rope_deltas_holder(model):
    """The submodule that stores the last prompt's rope_deltas (Qwen2VLModel and kin)."""
    return next((module for module in model.modules() if "rope_deltas" in vars(module)), None)


def forget_rope_deltas(model) -> None:
    """Before a prompt forward given explicit text position_ids (no image grid): its rope
    deltas are zero, so drop any an earlier forward left on the model."""
    holder = _rope_deltas_holder(model)
    if holder is not None:
        holder.rope_deltas = None


def decode_positions(model, next_positions: torch.Tensor) -> torch.Tensor:
    """The position_ids of the first decode step, as a buffer to advance in place.

    next_positions [B]: each row's text position of the token fed first (prompt_positions'
    last + 1). Returns long [B, 1], or [3, B, 1] for an M-RoPE model: text position +
    rope_deltas of the model's last prompt forward (None there: a text-only prompt, zero)."""
    positions = next_positions.reshape(-1, 1).long()
    if not uses_mrope(model):
        return positions.clone()
    holder = _rope_deltas_holder(model)
    if holder is None:
        raise ValueError(f"{type(model).__name__} uses multimodal rotary positions (mrope_section) but keeps no "
                         "rope_deltas from its prompt forward: the static decoder cannot place its tokens")
    deltas = holder.rope_deltas
    if deltas is not None:
        deltas = deltas.to(positions.device, torch.long).reshape(-1, 1)
        batch = positions.shape[0]
        if batch % deltas.shape[0]:
            raise ValueError(f"the model's rope_deltas are for {deltas.shape[0]} rows but next_positions has {batch}")
        # generate() expands rows with repeat_interleave (as the model's own decode rule)
        positions = positions + deltas.repeat_interleave(batch // deltas.shape[0], dim=0)
    return positions[None].expand(MROPE_AXES, -1, -1).clone()


__all__ = ["decode_positions", "forget_rope_deltas", "uses_mrope"]
