"""Session 7: rel. error of the CUDA kernel vs the reference over long ranges, per variant."""
import sys
import torch
sys.path[:0] = ["tests", "."]
from packed_segments import make_segment, rel_err, to_cuda
from zipkv.kernels.decode_attention import decode_attention, decode_attention_reference


for n in (1024, 32768):
    for kbits, vbits in ((4, 4), (2, 2), (4, 2)):
        for seed in range(3):
            g = torch.Generator().manual_seed(kbits * 5 + vbits + 100 * seed)
            b, hkv, r, d = 1, 2, 4, 128
            seg = make_segment(b, hkv, n, d, kbits, cs=True, pieces=8, gen=g, value_bits=vbits)
            kf, vf = torch.randn(b, hkv, 3, d, generator=g).half(), torch.randn(b, hkv, 3, d, generator=g).half()
            q = torch.randn(b, hkv * r, 1, d, generator=g).half()
            ref = decode_attention_reference(q, [seg], kf, vf)
            seg = to_cuda(seg)
            out = decode_attention(q.cuda(), [seg], kf.cuda(), vf.cuda(), impl="triton", cuda_kernel=True,
                                   mma_ctas_per_sm=1, mma_min_blocks=2)
            out4 = decode_attention(q.cuda(), [seg], kf.cuda(), vf.cuda(), impl="triton", cuda_kernel=True)
            tri = decode_attention(q.cuda(), [seg], kf.cuda(), vf.cuda(), impl="triton", cuda_kernel=False)
            print(f"n={n:6d} k{kbits}v{vbits} seed{seed}: cuda(1 split) {rel_err(out.cpu(), ref):.2e} "
                  f"cuda(default) {rel_err(out4.cpu(), ref):.2e} triton {rel_err(tri.cpu(), ref):.2e}", flush=True)
