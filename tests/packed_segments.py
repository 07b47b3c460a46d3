"""Packed tiers built like the cache builds them (zipkv.quant), for the decode-kernel tests."""

import dataclasses

import torch

from zipkv.kernels.packed import PackedSegment
from zipkv.quant.schemes import quantize_keys_channelwise, quantize_values_tokenwise


def make_segment(b, h, n, d, bits, key_group=None, value_group=None, cs=True, pieces=1, dtype=torch.float16, gen=None,
                 value_bits=None):
    """A tier built like the cache does: `pieces` blocks appended, each quantized alone.
    `bits` for the keys, `value_bits` (default: bits) for the values."""
    value_bits = value_bits or bits
    k = (torch.randn(b, h, n, d, generator=gen) * 2 + 0.5).to(dtype)
    v = torch.randn(b, h, n, d, generator=gen).to(dtype)
    bounds = torch.linspace(0, n, pieces + 1).long().tolist()
    parts = {name: [] for name in ("kc", "ks", "km", "tg", "vc", "vs", "vm", "vch", "tc")}
    g0 = 0
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        kc, ks, km, groups = quantize_keys_channelwise(k[:, :, lo:hi], bits, key_group)
        parts["kc"].append(kc)
        parts["ks"].append(ks)
        parts["km"].append(km)
        parts["tg"].append(g0 + torch.arange(hi - lo) // (key_group or (hi - lo)))
        g0 += groups
        vc, vs, vm, f = quantize_values_tokenwise(v[:, :, lo:hi], value_bits, value_group, cs)
        parts["vc"].append(vc)
        parts["vs"].append(vs)
        parts["vm"].append(vm)
        if cs:
            parts["vch"].append(f)
            parts["tc"].append(torch.full((hi - lo,), i))
    cat = {name: (torch.cat(x, 2) if x and x[0].dim() == 4 else (torch.cat(x) if x else None)) for name, x in parts.items()}
    return PackedSegment(bits, cat["kc"], cat["ks"], cat["km"], cat["tg"].int(), cat["vc"], cat["vs"], cat["vm"],
                         cat["vch"], None if cat["tc"] is None else cat["tc"].int(), value_bits=value_bits)


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def in_capacity(seg, extra, gen):
    """seg's tensors inside buffers `extra` tokens longer, the slack filled with random codes
    and parameters (what a preallocated store holds past its valid tokens)."""
    def grow(t, dim):
        shape = list(t.shape)
        shape[dim] = extra
        if t.dtype == torch.uint8:
            junk = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        elif t.dtype == torch.int32:
            junk = torch.zeros(shape, dtype=torch.int32)
        else:
            junk = torch.randn(shape, generator=gen).to(t.dtype) * 10
        return torch.cat([t, junk], dim=dim)

    return PackedSegment(seg.bits, grow(seg.k_codes, 2), seg.k_scale, seg.k_min, grow(seg.token_group, 0),
                         grow(seg.v_codes, 2), grow(seg.v_scale, 2), grow(seg.v_min, 2), seg.v_channel,
                         None if seg.token_chunk is None else grow(seg.token_chunk, 0), value_bits=seg.value_bits)


def to_cuda(seg):
    """seg with every tensor moved to the GPU."""
    return dataclasses.replace(seg, **{f.name: getattr(seg, f.name).cuda() for f in dataclasses.fields(seg)
                                       if isinstance(getattr(seg, f.name), torch.Tensor)})
