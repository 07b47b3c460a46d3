"""Host side of the CUDA tensor-core decode kernel over one packed tier (mma_decode.cu, v9).

The kernel is compiled at run time with NVRTC (`torch.cuda._compile_kernel`), once per
configuration (head dim, bits, GQA rows, mask, dtype, warps), and launched on the current
stream, so CUDA graphs capture it like any other launch. It writes split partials in the
layout of the Triton decode kernel (`_triton_decode.py`), which still takes the fp16 part
and the log-sum-exp merge; `mma_supported` says when a tier can go this way (else Triton
takes it). Reference: `decode_attention_reference`; tests: tests/test_kernels_mma.py (GPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import cuda_launch
from .packed import PackedSegment

_SOURCE = Path(__file__).with_name("mma_decode.cu")
_KERNELS: dict = {}
_BLOCKS_PER_SM: dict = {}  # per configuration: the occupancy query is a driver call
_INT32_MAX = 2**31 - 1
TOKENS_PER_TILE = 16  # the M of one mma: a warp's step


def available(device: torch.device) -> str | None:
    """None when this device can run the kernel, else the reason."""
    if device.type != "cuda":
        return "the CUDA kernel needs a CUDA device"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "mma.sync m16n8k16 with bf16/fp16 needs compute capability >= 8.0"
    if not _SOURCE.exists():
        return f"{_SOURCE.name} is not installed with the package"
    return None


def mma_supported(query, seg: PackedSegment, mask_kind: int, mask_rows: bool, causal: bool) -> str | None:
    """None when `seg` can be read by the CUDA kernel, else the reason (Triton takes it)."""
    reason = available(query.device)
    if reason:
        return reason
    b, hq, tq, d = query.shape
    heads = seg.k_codes.shape[1]
    if d not in (64, 128):
        return f"head_dim {d} not in (64, 128)"
    if (hq // heads) * tq > 8:
        return f"{hq // heads} query heads per KV head x {tq} query tokens > 8 rows"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"query dtype {query.dtype} is not fp16/bf16"
    if seg.value_group != d:
        return f"value_group {seg.value_group} != head_dim {d} (one value scale per token only)"
    if mask_kind == 2 or mask_rows:
        return "only a bool keep-mask [B, Nt] is supported"
    if causal:
        return "causal masking is not supported"
    params = [seg.k_scale, seg.k_min, seg.v_scale, seg.v_min] + ([seg.v_channel] if seg.v_channel is not None else [])
    if any(p.dtype != query.dtype for p in params):
        return "the tier's scales must have the query's dtype"
    tensors = [seg.k_codes, seg.v_codes] + params
    if any(t.stride(-1) != 1 for t in tensors) or query.stride(-1) != 1:
        return "every tensor needs a unit last stride"
    if seg.k_scale.stride() != seg.k_min.stride() or seg.v_scale.stride() != seg.v_min.stride():
        return "scale and min must share strides"
    if any(s > _INT32_MAX for t in tensors + [query] for s in t.stride()):
        return "strides beyond int32"
    if max(seg.k_codes.stride(2), seg.v_codes.stride(2)) * seg.k_codes.shape[2] > _INT32_MAX:
        return "a head's code rows span more than 2 GiB"
    if seg.token_group.dtype != torch.int32 or (seg.token_chunk is not None and seg.token_chunk.dtype != torch.int32):
        return "token_group / token_chunk must be int32"
    return copy_alignment(seg)


_STATIC_SMEM = 48 * 1024  # the kernel's shared memory is static: at most 48 KiB per block


def ring_stages(query, seg: PackedSegment, warps: int, requested: int) -> int:
    """Stages of the per-warp cp.async ring: `requested`, fewer if the ring would not fit the
    block's static shared memory beside the warps' output rows; 0 if not even 2 fit."""
    d = query.shape[-1]
    w, wv = d * seg.bits // 8, d * seg.value_bits // 8
    stage = 16 * w + 16 * (wv + 16) + 224  # key rows, padded value rows, tg, tc, scale/min windows
    fixed = warps * 8 * (d + 2) * 4
    n = min(requested, (_STATIC_SMEM - fixed) // (warps * stage), 8)
    return n if n >= 2 else 0


def fit_warps(query, seg: PackedSegment, warps: int, min_blocks: int, ring: int) -> tuple[int, int] | None:
    """(warps, blocks per SM) that leave room for `ring`'s copy stages: wide tiers (8-bit rows
    of 128 channels) run with fewer warps per block and more blocks per SM; None if even one
    warp's 2 stages do not fit."""
    while warps > 1 and not ring_stages(query, seg, warps, ring):
        warps, min_blocks = warps // 2, min_blocks * 2
    return (warps, min_blocks) if ring_stages(query, seg, warps, ring) else None


def copy_alignment(seg: PackedSegment) -> str | None:
    """None when every tensor the ring copies in 16-byte pieces allows it, else the reason."""
    for name in ("k_codes", "v_codes"):
        t = getattr(seg, name)
        if t.shape[-1] % 16 or t.data_ptr() % 16 or any(s % 16 for s in t.stride()[:3]):
            return f"{name} rows must be 16-byte aligned multiples of 16 bytes"
    for name in ("token_group", "token_chunk"):
        t = getattr(seg, name)
        if t is not None and (t.data_ptr() % 16 or t.stride(-1) != 1):
            return f"{name} must be contiguous and 16-byte aligned"
    if seg.v_scale.stride(2) != 1 or seg.v_scale.data_ptr() % 2 or seg.v_min.data_ptr() % 2:
        return "value scale/min need a unit token stride"
    return None


def _kernel(defines: dict):
    key = tuple(sorted(defines.items()))
    k = _KERNELS.get(key)
    if k is None:
        header = "".join(f"#define {n} {int(v)}\n" for n, v in defines.items())
        k = torch.cuda._compile_kernel(header + _SOURCE.read_text(), "zipkv_mma_decode",
                                        nvcc_options=["--use_fast_math", "-std=c++17"])
        _KERNELS[key] = k
    return k


def registers(kernel) -> dict:
    """Registers per thread and local (spill) bytes of a compiled kernel (cuFuncGetAttribute)."""
    import ctypes

    lib = torch.cuda._utils._get_gpu_runtime_library()
    out = {}
    for name, attr in (("n_regs", 4), ("local_bytes", 3)):  # CU_FUNC_ATTRIBUTE_NUM_REGS, _LOCAL_SIZE_BYTES
        v = ctypes.c_int()
        if lib.cuFuncGetAttribute(ctypes.byref(v), attr, kernel.func) == 0:
            out[name] = v.value
    return out


def _defines(query, seg: PackedSegment, has_mask: bool, lens_dev: bool, warps: int, min_blocks: int,
             ring: int) -> dict:
    b, hq, tq, d = query.shape
    r = hq // seg.k_codes.shape[1]
    return dict(D=d, KBITS=seg.bits, VBITS=seg.value_bits, RT=r * tq, R=r, TQ=tq,
                HAS_VCH=seg.v_channel is not None, HAS_MASK=has_mask, BF16=query.dtype == torch.bfloat16,
                LENS_DEV=lens_dev, WARPS=warps, MIN_BLOCKS=min_blocks, RING=ring_stages(query, seg, warps, ring))


def blocks_per_sm(query, seg: PackedSegment, has_mask: bool, lens_dev: bool, warps: int = 4, min_blocks: int = 3,
                  ring: int = 4) -> int:
    """Blocks of this configuration resident per SM (registers and shared memory decide):
    the split planner sizes each launch in whole waves of them (a launch of 1.2 waves ran its
    last 0.2 wave on a nearly idle GPU: experiments/NOTES.md, v7)."""
    import ctypes

    defines = _defines(query, seg, has_mask, lens_dev, warps, min_blocks, ring)
    key = tuple(sorted(defines.items()))
    if key not in _BLOCKS_PER_SM:
        lib = torch.cuda._utils._get_gpu_runtime_library()
        n = ctypes.c_int()
        ok = lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), _kernel(defines).func,
                                                              ctypes.c_int(32 * warps), ctypes.c_size_t(0)) == 0
        _BLOCKS_PER_SM[key] = max(1, n.value) if ok else 1
    return _BLOCKS_PER_SM[key]


def launch(query, seg: PackedSegment, mask_u8, smb: int, smn: int, po, pl, *, qk_scale: float,
           tokens_per_split: int, splits: int, key_offset: int, part_base: int, s_total: int,
           n_dev=None, warps: int = 4, min_blocks: int = 3, ring: int = 4, record: list | None = None) -> None:
    """One launch over `splits` splits of `tokens_per_split` tokens of `seg` for every
    (batch row, KV head); writes po/pl rows [part_base, part_base + splits) of each.
    record: None, or a list this launch's defines and registers are appended to (a driver
    query: only when asked)."""
    b = query.shape[0]
    heads = seg.k_codes.shape[1]
    defines = _defines(query, seg, mask_u8 is not None, n_dev is not None, warps, min_blocks, ring)
    if defines["RING"] < 2:
        raise ValueError(f"{warps} warps leave no room for a 2-stage copy ring of this tier in 48 KiB")
    kernel = _kernel(defines)
    if record is not None:
        record.append(dict(defines=defines, **registers(kernel)))
    dummy = seg.token_group
    vch = seg.v_channel if seg.v_channel is not None else seg.v_scale
    vch_s = seg.v_channel.stride()[:3] if seg.v_channel is not None else (0, 0, 0)
    args = [query, *query.stride()[:3], float(qk_scale),
            seg.k_codes, *seg.k_codes.stride()[:3],
            seg.k_scale, seg.k_min, *seg.k_scale.stride()[:3], seg.token_group,
            seg.v_codes, *seg.v_codes.stride()[:3],
            seg.v_scale, seg.v_min, *seg.v_scale.stride()[:3],
            vch, *vch_s, seg.token_chunk if seg.token_chunk is not None else dummy,
            mask_u8 if mask_u8 is not None else dummy, smb, smn, po, pl,
            seg.num_tokens, n_dev if n_dev is not None else dummy, tokens_per_split, key_offset,
            heads, s_total, part_base, seg.k_scale.shape[2],
            seg.v_channel.shape[2] if seg.v_channel is not None else 0]
    cuda_launch.launch(kernel, (splits, b * heads, 1), (32 * warps, 1, 1), args)
