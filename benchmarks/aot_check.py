"""Compile the Triton kernels for sm_90 on a machine without a GPU (triton ships ptxas), to
catch compile errors and read registers/spills before spending device time.

python -m benchmarks.aot_check   (needs triton installed; no GPU)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
          torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


class Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kw)` records the call."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))
        return launch


def signature_of(fn, args, kwargs):
    names = fn.arg_names
    sig, const, attrs = {}, {}, {}
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k not in opts})
    for i, name in enumerate(names):
        v = values[name]
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
            const[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:  # as the JIT launcher specializes
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int) and v == 1:
            sig[name] = "constexpr"
            const[name] = 1
        elif isinstance(v, int):
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(v)}")
    return sig, const, opts, attrs


def compile_sm90(fn, args, kwargs, label):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, const, opts, attrs = signature_of(fn, args, kwargs)
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    cubin = k.asm["cubin"]
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln.strip() for ln in res.splitlines() if "REG" in ln), res.strip()[-200:])
    print(f"{label}: {opts} {line}")
    return k


def main():
    os.environ.pop("TRITON_INTERPRET", None)
    from zipkv.kernels import _triton_decode as td
    from benchmarks import bench_decode as bd

    rec = Recorder(td._decode_kernel)
    merge = Recorder(td._merge_kernel)
    td._decode_kernel, td._merge_kernel = rec, merge
    # use_asm: the CPU-side launch would otherwise pick the plain-shift unpack (no GPU here)
    variants = [dict(block_n=bn, num_warps=w, num_stages=s, use_asm=True) for bn in (32, 64) for w in (4, 8) for s in (1, 2)]
    for recipe in sys.argv[1:] or ["zipcache42", "kivi2"]:
        segs, kf, vf = bd.make_cache(recipe, 1, 2, 4096, 128, device="cpu")
        q = torch.randn(1, 8, 1, 128).half()
        for v in variants:
            rec.calls.clear()
            td.triton_decode_attention(q, segs, kf, vf, None, 0, 0.088, False, **v)
            for args, kwargs in rec.calls:
                compile_sm90(rec.fn, args, kwargs, f"{recipe} decode")
    args, kwargs = merge.calls[0]
    compile_sm90(merge.fn, args, kwargs, "merge")


if __name__ == "__main__":
    main()
