"""Session 7: the compiled window kernels vs their references on CUDA (bf16, Llama-3-8B heads)."""
import torch
from zipkv.kernels.window_step import window_append, window_append_reference, window_scores, window_scores_reference

g = torch.Generator(device="cuda").manual_seed(0)
b, hkv, r, w, d = 8, 8, 4, 232, 128
for dtype in (torch.bfloat16, torch.float16):
    kw = torch.randn(b, hkv, w, d, device="cuda", generator=g).to(dtype)
    vw = torch.randn(b, hkv, w, d, device="cuda", generator=g).to(dtype)
    keys = torch.randn(b, 1, hkv, d, device="cuda", generator=g).to(dtype).transpose(1, 2)
    vals = torch.randn(b, hkv, 1, d, device="cuda", generator=g).to(dtype)
    lengths = torch.tensor([1000, 2000, 150], dtype=torch.int32, device="cuda")
    outs = []
    for fn in (window_append, window_append_reference):
        k2, v2, f = kw.clone(), vw.clone(), torch.zeros((), dtype=torch.bool, device="cuda")
        fn(keys, vals, k2, v2, lengths, f)
        outs.append((k2, v2, f))
    print(dtype, "append equal:", all(torch.equal(x, y) for x, y in zip(*outs)))
    q = torch.randn(b, hkv * r, 1, d, device="cuda", generator=g).to(dtype)
    real = torch.ones(b, w, dtype=torch.bool, device="cuda")
    real[3, :40] = False
    res = []
    for fn in (window_scores, window_scores_reference):
        s, c = torch.zeros(b, hkv, w, device="cuda"), torch.zeros(b, 1, w, device="cuda")
        fn(q, kw, lengths, real, s, c, d ** -0.5)
        res.append((s, c))
    print(dtype, "scores max abs diff:", float((res[0][0] - res[1][0]).abs().max()),
          "counts equal:", torch.equal(res[0][1], res[1][1]))
