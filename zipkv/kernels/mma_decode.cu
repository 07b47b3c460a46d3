// Split-K decode attention over ONE packed tier, on tensor cores with hand-placed fragments
// (v7, issue 6). The host (mma_decode.py) compiles it with NVRTC, once per configuration,
// with the #defines below prepended; the Triton kernel still takes the fp16 part and the
// log-sum-exp merge. Reference: decode_attention_reference (decode_attention.py).
//
// Why a CUDA kernel: Triton pads the 4 GQA rows to a 16-row tile and splits warps along the
// tokens, so every block pays cross-warp reductions and shared-memory layout conversions
// (benchmarks/NOTES.md, v5). Here every warp owns a stream of 16-token tiles and its own
// online softmax over its own contiguous token range; packed bytes are loaded straight into the registers where mma.sync wants
// them and unpacked there (no shared memory until the final merge of the warps).
//
// mma.sync m16n8k16 (f16 in, f32 accumulate), lane = 4*g + t (g = lane/4, t = lane%4):
//   A [16 x 16]: a0 = (row g, k 2t..2t+1), a1 = (row g+8, ...), a2 = (row g, k 2t+8..), a3
//   B [16 x 8] : b0 = (k 2t..2t+1, col g), b1 = (k 2t+8..2t+9, col g)
//   C [16 x 8] : c0,c1 = (row g, cols 2t, 2t+1), c2,c3 = row g+8
// Rows are the R*TQ query rows of one KV head (<= 8, so a1 = a3 = 0 and c2/c3 are unused).
//
// Scores S = (q*s) @ codes^T + q.m per key group (channelwise keys): two n8 tiles of 8 tokens.
//   B: lane (g, t) holds token s0 + g (+8) and reads KB = W/4 bytes of its row at t*KB. The
//   k index of mma step (plane p, word j) maps byte i of that word to channel
//   p*W + t*KB + 4j + i (k = 2t, 2t+1, 2t+8, 2t+9 <- bytes 0..3); A (q*s) uses the same map.
//   C: lane (g, t) ends with row g's scores of tokens s0 + {2t, 2t+1, 2t+8, 2t+9}.
// Values O += (p*s_n) @ codes + p.m_n (tokenwise values, one scale per token):
//   A = p*s from those score registers (k = token), B: 16 n8 tiles of channels; lane (g, t)
//   reads VB = WV/8 bytes at g*VB of its 4 tokens' rows; tile (plane p, byte i), column n is
//   channel p*WV + n*VB + i. Channel factors (CS values) are per token chunk: a chunk's sum
//   is kept apart and folded in, times its factor row, when the chunk changes.
//
// Codes become fp16 with the magic-number trick: a byte x placed under 0x64 reads as
// 1024 + x in fp16 (exact); masking plane p leaves 1024 + code * 2^(p*BITS), and one fma by
// 2^-(p*BITS) gives the code exactly.
//
// Configuration (#define): D, KBITS, VBITS, RT (rows = R*TQ <= 8), R, TQ, HAS_VCH (0/1),
// HAS_MASK (0/1: bool keep-mask [B, Nt]), BF16 (0/1: q and all parameters are bf16, else fp16),
// LENS_DEV (0/1: the valid-token count is read from n_dev), WARPS, MIN_BLOCKS (per SM),
// PREFETCH (0/1: load tile i+1 into registers before computing tile i).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define W (D * KBITS / 8)    // key row bytes = channels per key plane
#define WV (D * VBITS / 8)   // value row bytes = channels per value plane
#define KB (W / 4)           // key bytes a lane reads per token
#define VB (WV / 8)          // value bytes a lane reads per token
#define KWORDS ((KB + 3) / 4)
#define VWORDS ((VB + 3) / 4)
#define KP (8 / KBITS)       // key planes
#define VP (8 / VBITS)       // value planes
#define KSTEPS (D / 16)      // mma k steps over the channels = KP * KB / 4
#define NT (D / 8)           // value n8 tiles = VP * VB

#define LAZY_LOG2 8.0f

__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Pulls the next parameter row (D half-precision values) towards L2 while this one is used,
// so a warp crossing a key group or value chunk boundary does not wait on HBM.
__device__ __forceinline__ void prefetch_row(const u16* row, int lane) {
    if (lane < D * 2 / 128) prefetch_l2(row + lane * 64);
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float to_f32(u16 x) {
#if BF16
    return __uint_as_float(((u32)x) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#endif
}

__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 r;
    asm volatile("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// Bytes 0 and 2 of w hold two packed bytes; returns their plane-p codes as fp16x2.
template <int BITS, int P>
__device__ __forceinline__ u32 codes_half2(u32 w) {
    constexpr u32 field = ((1u << BITS) - 1u) << (P * BITS);
    constexpr u32 mask = field | (field << 16);
    u32 x;
    asm volatile("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(x) : "r"(w), "r"(mask), "r"(0x64006400u));
    // x = 1024 + code * 2^(P*BITS) in each half; (x - 1024) * 2^-(P*BITS) = code, exactly.
    constexpr u32 inv = (u32)(15 - P * BITS) << 10;  // fp16 of 2^-(P*BITS)
    constexpr u32 mul = inv | (inv << 16);
    constexpr u32 negoff = (u32)(0x8000 | ((25 - P * BITS) << 10));  // -1024 * 2^-(P*BITS)
    constexpr u32 add = negoff | (negoff << 16);
    u32 r;
    asm volatile("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(mul), "r"(add));
    return r;
}

template <int BITS>
__device__ __forceinline__ u32 codes_plane(u32 w, int p) {
    // p is a compile-time constant after unrolling
    if (BITS == 8) return codes_half2<8, 0>(w);
    if (BITS == 4) return p == 0 ? codes_half2<4, 0>(w) : codes_half2<4, 1>(w);
    switch (p) {
        case 0: return codes_half2<2, 0>(w);
        case 1: return codes_half2<2, 1>(w);
        case 2: return codes_half2<2, 2>(w);
        default: return codes_half2<2, 3>(w);
    }
}

__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a2, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

template <int NBYTES>
__device__ __forceinline__ void load_bytes(u32* dst, const u8* src, bool ok) {
    if (NBYTES == 16) {
        uint4 v = ok ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
        dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
    } else if (NBYTES == 32) {
        uint4 v = ok ? reinterpret_cast<const uint4*>(src)[0] : make_uint4(0, 0, 0, 0);
        uint4 u = ok ? reinterpret_cast<const uint4*>(src)[1] : make_uint4(0, 0, 0, 0);
        dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
        dst[4] = u.x; dst[5] = u.y; dst[6] = u.z; dst[7] = u.w;
    } else if (NBYTES == 8) {
        uint2 v = ok ? *reinterpret_cast<const uint2*>(src) : make_uint2(0, 0);
        dst[0] = v.x; dst[1] = v.y;
    } else if (NBYTES == 4) {
        dst[0] = ok ? *reinterpret_cast<const u32*>(src) : 0u;
    } else {  // 2
        dst[0] = ok ? (u32)*reinterpret_cast<const u16*>(src) : 0u;
    }
}

// One tile's raw loads (prefetched one tile ahead).
struct Tile {
    u32 k[2][KWORDS];   // key bytes of tokens s0+g and s0+8+g
    u32 v[4][VWORDS];   // value bytes of tokens s0 + {2t, 2t+1, 2t+8, 2t+9}
    int grp[4];         // their key groups (-1: not a valid token)
    int chunk[4];       // their channel-factor chunks
    u32 svm[4];         // their value scale (low half) and min (high half), raw 16-bit
    u32 keep;           // bit i: token i valid and not masked
};

struct Args {
    const u16* q; long long sqb, sqh, sqt; float qk_scale;
    const u8* kc; long long skc_b, skc_h, skc_n;
    const u16* ks; const u16* km; long long sks_b, sks_h, sks_g; const int* tg;
    const u8* vc; long long svc_b, svc_h, svc_n;
    const u16* vs; const u16* vm; long long svs_b, svs_h, svs_n;
    const u16* vch; long long svch_b, svch_h, svch_c; const int* tc;
    const u8* mask; long long smb, smn;
    float* po; float* pl;
};

__device__ __forceinline__ int tile_token(int s0, int t, int i) {  // the lane's i-th score token
    return s0 + 2 * t + (i & 1) + ((i >> 1) << 3);
}

__device__ __forceinline__ void load_tile(Tile& T, const Args& a, int b, int h, int s0, int n_end,
                                          int key_offset, int g, int t) {
    const u8* kbase = a.kc + b * a.skc_b + h * a.skc_h;
#pragma unroll
    for (int nt = 0; nt < 2; nt++) {
        int tok = s0 + nt * 8 + g;
        load_bytes<KB>(T.k[nt], kbase + (long long)tok * a.skc_n + t * KB, tok < n_end);
    }
    const u8* vbase = a.vc + b * a.svc_b + h * a.svc_h;
    const u16* vsb = a.vs + b * a.svs_b + h * a.svs_h;
    const u16* vmb = a.vm + b * a.svs_b + h * a.svs_h;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int tok = tile_token(s0, t, i);
        bool ok = tok < n_end;
        load_bytes<VB>(T.v[i], vbase + (long long)tok * a.svc_n + g * VB, ok);
        T.grp[i] = ok ? a.tg[tok] : -1;
#if HAS_VCH
        T.chunk[i] = ok ? a.tc[tok] : -1;
#else
        T.chunk[i] = 0;
#endif
        T.svm[i] = ok ? ((u32)vsb[(long long)tok * a.svs_n] | ((u32)vmb[(long long)tok * a.svs_n] << 16)) : 0u;
#if HAS_MASK
        const bool keep = ok && a.mask[b * a.smb + (long long)(key_offset + tok) * a.smn] != 0;
#else
        const bool keep = ok;
#endif
        if (i == 0) T.keep = 0u;
        T.keep |= (u32)keep << i;
    }
}

// q*s of one key group in A-fragment order (a0, a2 per k step) and q.m of row g.
__device__ __forceinline__ void group_operand(u32* a0, u32* a2, float& qm, const Args& a, int b, int h,
                                              int grp, int g, int t) {
    float part = 0.f;
    const bool row_ok = g < RT;
    const int rr = row_ok ? g : 0;
    const u16* qrow = a.q + b * a.sqb + (h * R + rr / TQ) * a.sqh + (rr % TQ) * a.sqt;
    const u16* srow = a.ks + b * a.sks_b + h * a.sks_h + (long long)grp * a.sks_g;
    const u16* mrow = a.km + b * a.sks_b + h * a.sks_h + (long long)grp * a.sks_g;
#pragma unroll
    for (int p = 0; p < KP; p++) {
#pragma unroll
        for (int j = 0; j < KB / 4; j++) {
            float v[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int ch = p * W + t * KB + 4 * j + i;
                float qv = row_ok ? to_f32(qrow[ch]) * a.qk_scale : 0.f;
                v[i] = qv * to_f32(srow[ch]);
                part += qv * to_f32(mrow[ch]);
            }
            a0[p * (KB / 4) + j] = pack_half2(v[0], v[1]);
            a2[p * (KB / 4) + j] = pack_half2(v[2], v[3]);
        }
    }
    part += __shfl_xor_sync(0xffffffffu, part, 1);
    part += __shfl_xor_sync(0xffffffffu, part, 2);
    qm = part;
}

// Row g's scores of the lane's 4 tokens against one key group's operand.
__device__ __forceinline__ void tile_scores(float* s, const Tile& T, const u32* a0, const u32* a2, float qm) {
    float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int nt = 0; nt < 2; nt++) {
#pragma unroll
        for (int j = 0; j < KB / 4; j++) {
            u32 w = T.k[nt][j];
            u32 lo = prmt(w, 0u, 0x1100u);  // bytes 0, 1 -> k 2t, 2t+1
            u32 hi = prmt(w, 0u, 0x3322u);  // bytes 2, 3 -> k 2t+8, 2t+9
#pragma unroll
            for (int p = 0; p < KP; p++) {
                int ks = p * (KB / 4) + j;
                mma16816(c[nt], a0[ks], a2[ks], codes_plane<KBITS>(lo, p), codes_plane<KBITS>(hi, p));
            }
        }
    }
    s[0] = c[0][0] + qm; s[1] = c[0][1] + qm; s[2] = c[1][0] + qm; s[3] = c[1][1] + qm;
}

// acc[n8 tile] += (p*s) @ value codes over the tile's 16 tokens; pa0/pa2: A fragments.
__device__ __forceinline__ void tile_values(float (*acc)[2], const Tile& T, u32 pa0, u32 pa2) {
#pragma unroll
    for (int wd = 0; wd < VWORDS; wd++) {
#pragma unroll
        for (int bi = 0; bi < 4 && wd * 4 + bi < VB; bi++) {
            const u32 sel = (u32)((4 + bi) << 8) | (u32)bi;  // byte bi of token a -> byte 0, of b -> byte 2
            u32 w01 = prmt(T.v[0][wd], T.v[1][wd], sel);
            u32 w23 = prmt(T.v[2][wd], T.v[3][wd], sel);
#pragma unroll
            for (int p = 0; p < VP; p++) {
                int tile = p * VB + wd * 4 + bi;
                float c[4] = {acc[tile][0], acc[tile][1], 0.f, 0.f};
                mma16816(c, pa0, pa2, codes_plane<VBITS>(w01, p), codes_plane<VBITS>(w23, p));
                acc[tile][0] = c[0];
                acc[tile][1] = c[1];
            }
        }
    }
}

// Smallest and largest id among the warp's valid tokens (ids < 0 mark invalid tokens).
__device__ __forceinline__ int warp_min_id(const int* id) {
    int m = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < 4; i++) m = id[i] < 0 ? m : min(m, id[i]);
    return __reduce_min_sync(0xffffffffu, m);
}
__device__ __forceinline__ int warp_max_id(const int* id) {
    return __reduce_max_sync(0xffffffffu, max(max(id[0], id[1]), max(id[2], id[3])));
}

// Output channel of the lane's accumulator (n8 tile, column 2t + e).
__device__ __forceinline__ int acc_channel(int tile, int t, int e) {
    int p = tile / VB, i = tile % VB;
    return p * WV + (2 * t + e) * VB + i;
}

// Flat parameters (NVRTC launches pass each argument by pointer: tensors, int32, double).
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
zipkv_mma_decode(const u16* q, int sqb, int sqh, int sqt, double qk_scale,
                 const u8* kc, int skc_b, int skc_h, int skc_n,
                 const u16* ks, const u16* km, int sks_b, int sks_h, int sks_g, const int* tg,
                 const u8* vc, int svc_b, int svc_h, int svc_n,
                 const u16* vs, const u16* vm, int svs_b, int svs_h, int svs_n,
                 const u16* vch, int svch_b, int svch_h, int svch_c, const int* tc,
                 const u8* mask, int smb, int smn, float* po, float* pl,
                 int N, const int* n_dev, int tokens_per_split, int key_offset, int H, int S_total,
                 int part_base, int n_groups, int n_chunks) {
    Args a;
    a.q = q; a.sqb = sqb; a.sqh = sqh; a.sqt = sqt; a.qk_scale = (float)qk_scale;
    a.kc = kc; a.skc_b = skc_b; a.skc_h = skc_h; a.skc_n = skc_n;
    a.ks = ks; a.km = km; a.sks_b = sks_b; a.sks_h = sks_h; a.sks_g = sks_g; a.tg = tg;
    a.vc = vc; a.svc_b = svc_b; a.svc_h = svc_h; a.svc_n = svc_n;
    a.vs = vs; a.vm = vm; a.svs_b = svs_b; a.svs_h = svs_h; a.svs_n = svs_n;
    a.vch = vch; a.svch_b = svch_b; a.svch_h = svch_h; a.svch_c = svch_c; a.tc = tc;
    a.mask = mask; a.smb = smb; a.smn = smn; a.po = po; a.pl = pl;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int split = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H;
#if LENS_DEV
    N = min(N, *n_dev);
#endif
    const int n_begin = split * tokens_per_split;
    const int n_end = min(n_begin + tokens_per_split, N);

    float m_run = neg_inf(), l_run = 0.f, pm = 0.f;
    float acc[NT][2];
#pragma unroll
    for (int i = 0; i < NT; i++) acc[i][0] = acc[i][1] = 0.f;
    // The warp's output rows live in shared memory (each lane owns the elements of its
    // accumulator fragment, so no barrier): finished value chunks are folded in there, which
    // keeps a second set of 2*NT accumulators out of the registers.
    __shared__ float sm_m[WARPS][8], sm_l[WARPS][8];
    __shared__ float sm_o[WARPS][8][D];
    float* my_o = &sm_o[warp][g][0];
#if HAS_VCH
#pragma unroll
    for (int i = 0; i < NT; i++) my_o[acc_channel(i, t, 0)] = my_o[acc_channel(i, t, 1)] = 0.f;
    int cur_chunk = -1;
    const u16* fbase = a.vch + b * a.svch_b + h * a.svch_h;
#endif
    u32 qa0[KSTEPS], qa2[KSTEPS];
    float qm = 0.f;
    int cur_grp = -1;

    // Each warp takes a contiguous quarter (WARPS-th) of the split: key groups and value
    // chunks are runs of tokens, so a warp changes group rarely (interleaved tiles made every
    // warp reload q*s at each 128-token group of a streamed cache).
    const int per_warp = tokens_per_split / WARPS;  // a multiple of 16 (host)
    const int w_begin = n_begin + warp * per_warp;
    const int w_end = min(w_begin + per_warp, n_end);
    Tile cur;
    int s0 = w_begin;
#if PREFETCH  // registers hold the next tile's loads while this one is computed
    Tile nxt;
    if (s0 < w_end) load_tile(cur, a, b, h, s0, w_end, key_offset, g, t);
#endif
    for (; s0 < w_end; s0 += 16) {
#if PREFETCH
        const int s1 = s0 + 16;
        if (s1 < w_end) load_tile(nxt, a, b, h, s1, w_end, key_offset, g, t);
#else
        load_tile(cur, a, b, h, s0, w_end, key_offset, g, t);
#endif

        // ---- scores, one pass per key group present in the tile (usually one)
        float s[4] = {0.f, 0.f, 0.f, 0.f};
        const int glo = warp_min_id(cur.grp), ghi = warp_max_id(cur.grp);
        for (int grp = glo; grp <= ghi; grp++) {
            if (grp != cur_grp) {
                group_operand(qa0, qa2, qm, a, b, h, grp, g, t);
                cur_grp = grp;
                if (grp + 1 < n_groups) {
                    const long long off = b * a.sks_b + h * a.sks_h + (long long)(grp + 1) * a.sks_g;
                    prefetch_row(a.ks + off, lane);
                    prefetch_row(a.km + off, lane);
                }
            }
            float sg[4];
            tile_scores(sg, cur, qa0, qa2, qm);
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (cur.grp[i] == grp) s[i] = sg[i];
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (!((cur.keep >> i) & 1u)) s[i] = neg_inf();

        // ---- online softmax of row g (the 4 lanes t of a row hold its 16 tokens)
        float mx = fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // Lazy rescaling: the running max moves only when a score passes it by more than
        // LAZY_LOG2 (p <= 2^LAZY_LOG2 meanwhile, safe in fp16 operands and fp32 sums); the final
        // normalization uses the same max, so the result is exact, and the accumulators are
        // rescaled a few times per split instead of at most tiles (random data: half of them).
        const bool grow = mx > m_run + LAZY_LOG2;
        const float m_new = grow ? mx : m_run;
        const float m_safe = m_new == neg_inf() ? 0.f : m_new;
        const float alpha = grow ? exp2f(m_run - m_safe) : 1.f;
        float pr[4];
#pragma unroll
        for (int i = 0; i < 4; i++) pr[i] = exp2f(s[i] - m_safe);
        l_run = l_run * alpha + (pr[0] + pr[1]) + (pr[2] + pr[3]);
        m_run = m_new;
        if (__any_sync(0xffffffffu, alpha != 1.f)) {
            pm *= alpha;
#pragma unroll
            for (int i = 0; i < NT; i++) { acc[i][0] *= alpha; acc[i][1] *= alpha; }
#if HAS_VCH
            if (cur_chunk >= 0) {
#pragma unroll
                for (int i = 0; i < NT; i++) {
                    my_o[acc_channel(i, t, 0)] *= alpha;
                    my_o[acc_channel(i, t, 1)] *= alpha;
                }
            }
#endif
        }

        // ---- values: (p * s_n) @ codes + p . m_n, per channel-factor chunk
        float ps[4], pmv[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            ps[i] = pr[i] * to_f32((u16)(cur.svm[i] & 0xffffu));
            pmv[i] = pr[i] * to_f32((u16)(cur.svm[i] >> 16));
        }
#if HAS_VCH
        const int clo = warp_min_id(cur.chunk), chi = warp_max_id(cur.chunk);
        for (int c = clo; c <= chi; c++) {
            if (c != cur_chunk) {
                if (cur_chunk >= 0) {  // fold the finished chunk: out += f * (acc + p.m)
                    float pt = pm + __shfl_xor_sync(0xffffffffu, pm, 1);
                    pt += __shfl_xor_sync(0xffffffffu, pt, 2);
                    const u16* frow = fbase + (long long)cur_chunk * a.svch_c;
#pragma unroll
                    for (int i = 0; i < NT; i++) {
                        my_o[acc_channel(i, t, 0)] += to_f32(frow[acc_channel(i, t, 0)]) * (acc[i][0] + pt);
                        my_o[acc_channel(i, t, 1)] += to_f32(frow[acc_channel(i, t, 1)]) * (acc[i][1] + pt);
                        acc[i][0] = acc[i][1] = 0.f;
                    }
                    pm = 0.f;
                }
                cur_chunk = c;
                if (c + 1 < n_chunks) prefetch_row(fbase + (long long)(c + 1) * a.svch_c, lane);
            }
            float q4[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                bool in = cur.chunk[i] == c;
                q4[i] = in ? ps[i] : 0.f;
                pm += in ? pmv[i] : 0.f;
            }
            tile_values(acc, cur, pack_half2(q4[0], q4[1]), pack_half2(q4[2], q4[3]));
        }
#else
        pm += (pmv[0] + pmv[1]) + (pmv[2] + pmv[3]);
        tile_values(acc, cur, pack_half2(ps[0], ps[1]), pack_half2(ps[2], ps[3]));
#endif
#if PREFETCH
        cur = nxt;
#endif
    }

    // ---- this warp's result for row g: sm_o (+ acc + p.m), unnormalized, with m_run, l
    float pt = pm + __shfl_xor_sync(0xffffffffu, pm, 1);
    pt += __shfl_xor_sync(0xffffffffu, pt, 2);
    float l = l_run + __shfl_xor_sync(0xffffffffu, l_run, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
#if HAS_VCH
    if (cur_chunk >= 0) {
        const u16* frow = fbase + (long long)cur_chunk * a.svch_c;
#pragma unroll
        for (int i = 0; i < NT; i++) {
            my_o[acc_channel(i, t, 0)] += to_f32(frow[acc_channel(i, t, 0)]) * (acc[i][0] + pt);
            my_o[acc_channel(i, t, 1)] += to_f32(frow[acc_channel(i, t, 1)]) * (acc[i][1] + pt);
        }
    }
#else
#pragma unroll
    for (int i = 0; i < NT; i++) {
        my_o[acc_channel(i, t, 0)] = acc[i][0] + pt;
        my_o[acc_channel(i, t, 1)] = acc[i][1] + pt;
    }
#endif

    // ---- merge the warps (shared memory) and write the split's partial
    if (t == 0) { sm_m[warp][g] = m_run; sm_l[warp][g] = l; }
    __syncthreads();
    const int row0 = ((b * H + h) * S_total + part_base + split) * RT;
    for (int idx = threadIdx.x; idx < RT * D; idx += WARPS * 32) {
        const int r = idx / D, ch = idx % D;
        float M = neg_inf();
#pragma unroll
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, sm_m[w][r]);
        const float Ms = M == neg_inf() ? 0.f : M;
        float L = 0.f, O = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            const float f = exp2f(sm_m[w][r] - Ms);
            L += f * sm_l[w][r];
            O += f * sm_o[w][r][ch];
        }
        a.po[(long long)(row0 + r) * D + ch] = L > 0.f ? O / L : 0.f;
        if (ch == 0) a.pl[row0 + r] = L > 0.f ? Ms + log2f(L) : neg_inf();
    }
}
