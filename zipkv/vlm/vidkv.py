"""VidKV's 1.x-bit scheme for visual tokens (Tao et al. 2025, arXiv 2503.16257; methods.md s. 3).

Keys, per (batch row, KV head) and block of tokens:
- the D/2 channels of widest range (max - min over the block) are quantized channelwise at
  2 bits (one scale / min per channel and token group), like ZipCache / KIVI keys;
- the other D/2 channels go through a real FFT over those channels (per token), and each of
  the resulting D/2 real numbers (real parts of bins 0..D/4, imaginary parts of bins
  1..D/4-1; the DC and Nyquist imaginary parts are zero) is binarized: code = sign, value
  = sign * mean|y| of that component over the token group. The inverse FFT restores the
  channels. Storing the half spectrum keeps this at 1 bit per channel (the reference code
  binarizes the full complex spectrum: 2 bits per channel).
  Which channels are 2-bit is stored as a packed bit mask per block.
Values: ternary per channel (1.58 bits of information): per channel and token group,
  m = mean|x|, code = sign(x) if |x| > 0.5 m else 0, and the scale is the least-squares one
  for those codes, alpha = mean |x| over the nonzero codes (x' = code * alpha). Codes are
  packed five per byte (3^5 = 243 <= 256): 1.6 bits per value, counted as such.

Everything here is the reference (pure PyTorch); `VidKVTier` stores its outputs.
"""

from __future__ import annotations

import torch

from ..quant.packing import pack, unpack
from ..quant.quantizer import param_dtype, quantize

TRITS_PER_BYTE = 5
_POW3 = (1, 3, 9, 27, 81)


def check_head_dim(head_dim: int) -> int:
    """VidKV needs head_dim % 16 == 0: D/2 channels per half, packed 4 (2-bit) and 8 (1-bit) per
    byte, and an even-length FFT."""
    if head_dim % 16:
        raise ValueError(f"visual_low_bits='vidkv' needs head_dim to be a multiple of 16 (got {head_dim})")
    return head_dim


# -- bit packing ---------------------------------------------------------------------------------
def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool/0-1 [..., n] (n % 8 == 0) -> uint8 [..., n/8]; element 8j+p is bit p of byte j."""
    if bits.shape[-1] % 8:
        raise ValueError(f"last dimension {bits.shape[-1]} must be a multiple of 8 to pack bits")
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    grouped = bits.to(torch.uint8).reshape(*bits.shape[:-1], -1, 8)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], -1).bool()


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """int [..., n] with values in {-1, 0, 1} -> uint8 [..., ceil(n/5)], base 3, five per byte."""
    n = codes.shape[-1]
    padded = torch.nn.functional.pad((codes + 1).to(torch.int16), (0, -n % TRITS_PER_BYTE))
    grouped = padded.reshape(*codes.shape[:-1], -1, TRITS_PER_BYTE)
    weights = torch.tensor(_POW3, dtype=torch.int16, device=codes.device)
    return (grouped * weights).sum(dim=-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., m] -> int8 [..., n] in {-1, 0, 1}."""
    weights = torch.tensor(_POW3, dtype=torch.int16, device=packed.device)
    digits = (packed.to(torch.int16).unsqueeze(-1) // weights) % 3
    return (digits.reshape(*packed.shape[:-1], -1)[..., :n] - 1).to(torch.int8)


# -- token groups ----------------------------------------------------------------------------------
def _grouped(x: torch.Tensor, group: int):
    """x [B, H, n, C] -> (zero-padded [B, H, G, group, C], valid mask [1, 1, G, group, 1])."""
    b, h, n, c = x.shape
    g = -(-n // group)
    padded = torch.nn.functional.pad(x, (0, 0, 0, g * group - n))
    valid = (torch.arange(g * group, device=x.device) < n).reshape(1, 1, g, group, 1)
    return padded.reshape(b, h, g, group, c), valid


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"cannot quantize {name} that contain NaN or inf")


# -- keys ----------------------------------------------------------------------------------------
def _half_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Real FFT over the last axis (even length L) as L reals: Re(0..L/2), Im(1..L/2-1)."""
    spectrum = torch.fft.rfft(x.float(), dim=-1)
    return torch.cat([spectrum.real, spectrum.imag[..., 1:-1]], dim=-1)


def _from_half_spectrum(y: torch.Tensor) -> torch.Tensor:
    length = y.shape[-1]
    half = length // 2
    zero = torch.zeros_like(y[..., :1])
    imag = torch.cat([zero, y[..., half + 1:], zero], dim=-1)
    return torch.fft.irfft(torch.complex(y[..., : half + 1], imag), n=length, dim=-1)


def wide_channel_mask(keys: torch.Tensor) -> torch.Tensor:
    """bool [B, H, D]: the D/2 channels of widest range (max - min over tokens) per (b, h)."""
    k = keys.float()
    spread = k.amax(dim=2) - k.amin(dim=2)
    top = spread.topk(keys.shape[-1] // 2, dim=-1).indices
    return torch.zeros_like(spread, dtype=torch.bool).scatter_(-1, top, True)


def _split_order(mask: torch.Tensor) -> torch.Tensor:
    """Channel indices [.., D]: the masked channels ascending, then the others ascending."""
    return (~mask).to(torch.int8).argsort(dim=-1, stable=True)


def spectrum_dtype(keys: torch.Tensor, magnitude: torch.Tensor) -> torch.dtype:
    """dtype of the spectrum magnitudes: a component sums D/2 channels, so fp16 keys near the
    fp16 limit have magnitudes beyond it (stored as inf: keys restored as inf / NaN). bf16
    keys keep bf16 (its range is fp32's); otherwise fp16 when the magnitudes fit, else fp32."""
    return torch.bfloat16 if keys.dtype == torch.bfloat16 else param_dtype(magnitude)


def quantize_keys_vidkv(keys: torch.Tensor, group: int):
    """keys [B, H, n, D] -> dict of packed codes and parameters (one block)."""
    _check_finite(keys, "keys")
    b, h, n, d = keys.shape
    check_head_dim(d)
    mask = wide_channel_mask(keys)  # [B, H, D]
    order = _split_order(mask)[:, :, None, :].expand(b, h, n, d)
    wide = keys.gather(3, order[..., : d // 2])
    narrow = keys.gather(3, order[..., d // 2:])
    # 2-bit channelwise over token groups (the same quantizer as ZipCache keys)
    grouped, valid = _grouped(wide.float(), group)
    # padded rows are copies of the group's first token so they leave min / max unchanged
    grouped = torch.where(valid, grouped, grouped[:, :, :, :1])
    codes, scale, minimum = quantize(grouped, 2, dims=3, out_dtype=param_dtype(keys))
    wide_codes = pack(codes.reshape(b, h, -1, d // 2)[:, :, :n], 2)
    # 1 bit per half-spectrum component: sign, and mean |y| over the real tokens of the group
    spectrum = _half_spectrum(narrow)
    grouped, valid = _grouped(spectrum, group)
    count = valid.sum(dim=3, keepdim=True).clamp_min(1)
    magnitude = (grouped.abs() * valid).sum(dim=3, keepdim=True) / count
    return dict(
        channel_mask=pack_bits(mask).unsqueeze(2),  # [B, H, 1 block, D/8]
        wide_codes=wide_codes,  # [B, H, n, D/8]
        wide_scale=scale.squeeze(3),  # [B, H, G, D/2]
        wide_min=minimum.squeeze(3),
        narrow_codes=pack_bits(spectrum >= 0),  # [B, H, n, D/16]
        narrow_scale=magnitude.squeeze(3).to(spectrum_dtype(keys, magnitude)),  # [B, H, G, D/2]
    )


def dequantize_keys_vidkv(channel_mask, wide_codes, wide_scale, wide_min, narrow_codes, narrow_scale,
                          token_group, token_block, dtype=torch.float32):
    """Reference: keys [B, H, N, D]. channel_mask [B, H, K, D/8] (one row per block);
    token_group / token_block: int [N], each token's key group (index into the scales) and
    block (index into channel_mask)."""
    group, block = token_group.long(), token_block.long()
    wide = unpack(wide_codes, 2).float() * wide_scale[:, :, group].float() + wide_min[:, :, group].float()
    signs = unpack_bits(narrow_codes).float() * 2 - 1
    narrow = _from_half_spectrum(signs * narrow_scale[:, :, group].float())
    mask = unpack_bits(channel_mask)[:, :, block]  # [B, H, N, D]
    order = _split_order(mask)
    half = wide.shape[-1]
    out = torch.empty(*wide.shape[:3], 2 * half, device=wide.device)
    out.scatter_(3, order[..., :half], wide)
    out.scatter_(3, order[..., half:], narrow)
    return out.to(dtype)


# -- values --------------------------------------------------------------------------------------
def quantize_values_ternary(values: torch.Tensor, group: int):
    """values [B, H, n, D] -> (packed trits [B, H, ceil(n*D/5)] (token-major), alpha [B, H, G, D])."""
    _check_finite(values, "values")
    b, h, n, d = values.shape
    grouped, valid = _grouped(values.float(), group)
    count = valid.sum(dim=3, keepdim=True).clamp_min(1)
    magnitude = grouped.abs()
    threshold = 0.5 * magnitude.sum(dim=3, keepdim=True) / count  # padded rows are zero: no effect
    keep = (magnitude > threshold) & valid
    codes = torch.where(keep, grouped.sign(), torch.zeros_like(grouped))
    alpha = (magnitude * keep).sum(dim=3, keepdim=True) / keep.sum(dim=3, keepdim=True).clamp_min(1)
    codes = codes.reshape(b, h, -1, d)[:, :, :n]
    return pack_trits(codes.reshape(b, h, n * d)), alpha.squeeze(3).to(param_dtype(values))


def dequantize_values_ternary(packed, alpha, token_group, head_dim: int, dtype=torch.float32):
    """Reference: values [B, H, N, D] from one block's packed trits and its alpha [B, H, G, D]."""
    n = token_group.shape[0]
    codes = unpack_trits(packed, n * head_dim).reshape(*packed.shape[:2], n, head_dim)
    return (codes.float() * alpha[:, :, token_group.long()].float()).to(dtype)
