// Split-K decode attention over ONE packed tier, on tensor cores with hand-placed fragments
// (v9, issue 6). The host (mma_decode.py) compiles it with NVRTC, once per configuration,
// with the #defines below prepended; the Triton kernel still takes the fp16 part and the
// log-sum-exp merge. Reference: decode_attention_reference (decode_attention.py).
//
// Every warp owns a contiguous token range, streams it in 16-token tiles through its own
// cp.async ring in shared memory (RING stages: RING-1 tiles in flight, no registers held for
// them) and keeps its own online softmax; the warps of a block merge once, at the end.
//
// Tokens are the M dimension of mma.sync m16n8k16 (f16 in, f32 accumulate) and the <= 8 query
// rows of a KV head are N, so no fragment is zero padding (v7 put the rows in M: half of every
// A fragment was zeros and it took twice the mma and register moves; benchmarks/NOTES.md, v8).
// lane = 4*g + t (g = lane/4, t = lane%4):
//   A [16 x 16]: a0 = (row g, k 2t..2t+1), a1 = (row g+8, ...), a2 = (row g, k 2t+8..), a3 = (g+8, ..)
//   B [16 x 8] : b0 = (k 2t..2t+1, col g), b1 = (k 2t+8..2t+9, col g)
//   C [16 x 8] : c0,c1 = (row g, cols 2t, 2t+1), c2,c3 = (row g+8, cols 2t, 2t+1)
//
// Scores S^T = codes @ (q*s)^T + q.m per key group (channelwise keys): A = key codes of tokens
//   g, g+8 (lane (g, t) reads KB = W/4 bytes of each row at t*KB; byte i of word j of plane p is
//   channel p*W + t*KB + 4j + i, k = 2t, 2t+1, 2t+8, 2t+9 <- bytes 0..3), B = q*s of row g in
//   the same channel order. C: lane (g, t) holds tokens g, g+8 x rows 2t, 2t+1.
// Values O^T += codes^T @ (p*s_n)^T + p.m_n (tokenwise values, one scale per token): A = value
//   codes of channel pairs (M) x the tile's tokens (K): lane (g, t) reads VB = WV/8 bytes at
//   g*VB of tokens 2t, 2t+1, 2t+8, 2t+9; byte bi of plane p ("combo" c = p*VB + bi) is channel
//   p*WV + g*VB + bi; m16 tile u takes combo 2u in rows g and 2u+1 in rows g+8. B = (p*s)^T:
//   the score C fragments, one movmatrix.trans each, are exactly b0 and b1. Channel factors (CS
//   values) are per token chunk: a chunk's sum is kept apart and folded in, times its factor
//   row, when the chunk changes.
//
// Codes become fp16 with the magic-number trick: a byte x placed under 0x64 reads as
// 1024 + x in fp16 (exact); masking plane p leaves 1024 + code * 2^(p*BITS), and one fma by
// 2^-(p*BITS) gives the code exactly. Value codes take that fma; key codes enter the score mma
// as the masked word itself, their offset and weight folded into the group's operand (v9,
// group_operand).
//
// Configuration (#define): D, KBITS, VBITS, RT (rows = R*TQ <= 8), R, TQ, HAS_VCH (0/1),
// HAS_MASK (0/1: bool keep-mask [B, Nt]), BF16 (0/1: q and all parameters are bf16, else fp16),
// LENS_DEV (0/1: the valid-token count is read from n_dev), WARPS, MIN_BLOCKS (per SM),
// RING (2..8 stages; the host checks the 16-byte alignment the copies need).

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
#define KSTEPS (D / 16)      // score mma k steps = KP * KB / 4
#define MT (D / 16)          // value mma m tiles (two combos each)

#define LAZY_LOG2 8.0f

// Stage layout (bytes): key rows [16][W], value rows [16][WV + 16] (the pad spreads the value
// fragment reads over all banks), token_group [16] int32, token_chunk [16] int32, value scale
// and min: 48-byte windows each, from the 16-byte boundary at or below the tile's first token
// (a head's scales need not start on one: [B, H, N, 1] with any N), read at an offset.
#define VPITCH (WV + 16)
#define ST_V (16 * W)
#define ST_TG (ST_V + 16 * VPITCH)
#define ST_TC (ST_TG + 64)
#define ST_VS (ST_TC + 64)
#define ST_VM (ST_VS + 48)
#define STAGE_BYTES (ST_VM + 48)

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

// The transpose of an 8x8 fp16 matrix held one row per 4 lanes (lane 4r + c: cols 2c, 2c+1).
__device__ __forceinline__ u32 transpose8x8(u32 x) {
    u32 r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}

// Bytes 0 and 2 of w hold two packed bytes; returns 1024 + (plane-p code) * 2^(P*BITS) in each
// fp16 half, exactly (the "magic number" 0x6400 = 1024 with the code's bits in the mantissa).
template <int BITS, int P>
__device__ __forceinline__ u32 magic_half2(u32 w) {
    constexpr u32 field = ((1u << BITS) - 1u) << (P * BITS);
    constexpr u32 mask = field | (field << 16);
    u32 x;
    asm volatile("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(x) : "r"(w), "r"(mask), "r"(0x64006400u));
    return x;
}

// The plane-p codes themselves as fp16x2: (x - 1024) * 2^-(P*BITS), exactly.
template <int BITS, int P>
__device__ __forceinline__ u32 codes_half2(u32 w) {
    const u32 x = magic_half2<BITS, P>(w);
    constexpr u32 inv = (u32)(15 - P * BITS) << 10;  // fp16 of 2^-(P*BITS)
    constexpr u32 mul = inv | (inv << 16);
    constexpr u32 negoff = (u32)(0x8000 | ((25 - P * BITS) << 10));  // -1024 * 2^-(P*BITS)
    constexpr u32 add = negoff | (negoff << 16);
    u32 r;
    asm volatile("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(mul), "r"(add));
    return r;
}

template <int BITS, int P, bool MAGIC>
__device__ __forceinline__ u32 plane_half2(u32 w) {
    return MAGIC ? magic_half2<BITS, P>(w) : codes_half2<BITS, P>(w);
}

// Plane p of two packed bytes as fp16x2: the codes, or (MAGIC) 1024 + code * 2^(p*BITS).
// p is a compile-time constant after unrolling.
template <int BITS, bool MAGIC>
__device__ __forceinline__ u32 unpack_plane(u32 w, int p) {
    if (BITS == 8) return plane_half2<8, 0, MAGIC>(w);
    if (BITS == 4) return p == 0 ? plane_half2<4, 0, MAGIC>(w) : plane_half2<4, 1, MAGIC>(w);
    switch (p) {
        case 0: return plane_half2<2, 0, MAGIC>(w);
        case 1: return plane_half2<2, 1, MAGIC>(w);
        case 2: return plane_half2<2, 2, MAGIC>(w);
        default: return plane_half2<2, 3, MAGIC>(w);
    }
}

// lo + hi of an fp16x2 word, in fp32 (exact: both convert exactly).
__device__ __forceinline__ float half2_sum(u32 x) {
    float lo, hi;
    asm("{.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;}"
        : "=f"(lo), "=f"(hi) : "r"(x));
    return lo + hi;
}

__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int NBYTES>
__device__ __forceinline__ void load_bytes(u32* dst, const u8* src) {  // shared memory, aligned
    if (NBYTES == 16 || NBYTES == 32) {
#pragma unroll
        for (int i = 0; i < NBYTES / 16; i++) {
            uint4 v = reinterpret_cast<const uint4*>(src)[i];
            dst[4 * i] = v.x; dst[4 * i + 1] = v.y; dst[4 * i + 2] = v.z; dst[4 * i + 3] = v.w;
        }
    } else if (NBYTES == 8) {
        uint2 v = *reinterpret_cast<const uint2*>(src);
        dst[0] = v.x; dst[1] = v.y;
    } else if (NBYTES == 4) {
        dst[0] = *reinterpret_cast<const u32*>(src);
    } else {  // 2
        dst[0] = (u32)*reinterpret_cast<const u16*>(src);
    }
}

// dst: a shared-memory address (32 bits); src_bytes < 16 zero-fills the rest of the piece.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

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

// What one lane copies of every tile. The pointers walk with the warp's copies (they point at
// the next tile to issue), so a full tile costs a 64-bit add per piece: v8's first cut
// recomputed the addresses from the token index per tile (~80 instructions of a ~420
// instruction tile, benchmarks/NOTES.md, v9).
struct Feed {
    const u8* k; const u8* v;  // the lane's first key / value piece of the next tile
    const u8* m;               // its per-token parameter piece (tg, tc, scale or min window)
    u32 k_dst, v_dst, m_dst;   // stage-relative shared offsets
    int k_row, v_row;          // tile row of the first key / value piece
    int m_tok, m_log;          // first token of the parameter piece relative to the tile; log2 bytes per token
    bool m_on;
};

#define K_PIECES_ROW (W / 16)
#define V_PIECES_ROW (WV / 16)

// The feed of `lane` for a warp whose first tile starts at token s_first.
__device__ __forceinline__ Feed make_feed(const Args& a, int b, int h, int lane, int s_first, int& shifts) {
    Feed f;
    f.k_row = lane / K_PIECES_ROW;
    f.k = a.kc + b * a.skc_b + h * a.skc_h + (long long)(s_first + f.k_row) * a.skc_n + 16 * (lane % K_PIECES_ROW);
    f.k_dst = f.k_row * W + 16 * (lane % K_PIECES_ROW);
    f.v_row = lane / V_PIECES_ROW;
    f.v = a.vc + b * a.svc_b + h * a.svc_h + (long long)(s_first + f.v_row) * a.svc_n + 16 * (lane % V_PIECES_ROW);
    f.v_dst = ST_V + f.v_row * VPITCH + 16 * (lane % V_PIECES_ROW);
    const long long soff = b * a.svs_b + h * a.svs_h;
    const unsigned long long vs_row = (unsigned long long)(a.vs + soff), vm_row = (unsigned long long)(a.vm + soff);
    const int vs_shift = (int)((vs_row & 15ull) >> 1), vm_shift = (int)((vm_row & 15ull) >> 1);
    shifts = vs_shift | (vm_shift << 8);
    // lanes 0-3: token_group, 4-7: token_chunk (4 tokens each), 8-10 / 11-13: scale / min windows
    const int piece = lane < 8 ? (lane & 3) : (lane - 8) % 3;
    f.m_on = lane < 14 && (HAS_VCH || lane < 4 || lane >= 8);
    if (lane < 8) {
        f.m = reinterpret_cast<const u8*>(lane < 4 ? a.tg : a.tc) + 16 * piece;
        f.m_dst = (lane < 4 ? ST_TG : ST_TC) + 16 * piece;
        f.m_tok = 4 * piece;
        f.m_log = 2;
    } else {
        const bool s = lane < 11;
        f.m = reinterpret_cast<const u8*>((s ? vs_row : vm_row) & ~15ull) + 16 * piece;
        f.m_dst = (s ? ST_VS : ST_VM) + 16 * piece;
        f.m_tok = 8 * piece - (s ? vs_shift : vm_shift);
        f.m_log = 1;
    }
    f.m += (long long)s_first << f.m_log;
    return f;
}

// Bytes of the lane's parameter piece inside a tile of `rows` valid tokens (a scale window's
// last piece reaches past the tile: part of it, or none).
__device__ __forceinline__ int param_bytes(const Feed& f, int rows) {
    return max(0, min(16 >> f.m_log, rows - f.m_tok)) << f.m_log;
}

// 16 rows of ROW bytes (token stride `stride` bytes) into a stage region of row pitch PITCH:
// lane `row` (and row + 32/(ROW/16) per further pass) copies its 16-byte piece of each; rows
// at or past `rows` are zero-filled (FULL: the tile has all 16).
template <int ROW, int PITCH, bool FULL>
__device__ __forceinline__ void copy_rows(u32 dst, const u8* src, int row, int stride, int rows) {
    constexpr int per_row = ROW / 16, rows_pass = 32 / per_row;
#pragma unroll
    for (int i = 0; i < (16 * per_row + 31) / 32; i++) {
        const int r = row + i * rows_pass;
        if (16 * per_row >= 32 || r < 16) {
            if (FULL) {
                cp_async16(dst + i * rows_pass * PITCH, src + i * rows_pass * stride);
            } else {
                const bool ok = r < rows;
                cp_async16(dst + i * rows_pass * PITCH, src + (ok ? i * rows_pass * stride : 0), ok ? 16 : 0);
            }
        }
    }
}

// The warp's lanes copy the next tile (its `rows` <= 16 tokens; the rest zero-filled) into the
// stage at shared address st, and step the feed to the tile after it.
// Offsets within a head fit 32 bits (the host checks strides * tokens < 2^31).
template <bool FULL>
__device__ __forceinline__ void issue_tile(u32 st, Feed& f, const Args& a, int rows) {
    copy_rows<W, W, FULL>(st + f.k_dst, f.k, f.k_row, (int)a.skc_n, rows);
    copy_rows<WV, VPITCH, FULL>(st + f.v_dst, f.v, f.v_row, (int)a.svc_n, rows);
    if (f.m_on) {
        const int n = param_bytes(f, FULL ? 16 : rows);
        cp_async16(st + f.m_dst, n ? f.m : f.v, n);
    }
    f.k += 16 * (int)a.skc_n;
    f.v += 16 * (int)a.svc_n;
    f.m += 16 << f.m_log;
}

// One tile's operands, read from its stage.
struct Tile {
    u32 k[2][KWORDS];   // key bytes of tokens g and g+8
    u32 v[4][VWORDS];   // value bytes of tokens 2t, 2t+1, 2t+8, 2t+9
    int grp[2];         // key groups of tokens g, g+8 (-1: not a valid token)
    int chunk[2];       // their channel-factor chunks
    float vsc[2], vmn[2];  // their value scale and min
    u32 keep;           // bit e: token g + 8e valid and not masked
};

__device__ __forceinline__ int value_token(int t, int i) { return 2 * t + (i & 1) + ((i >> 1) << 3); }

// The tile's operands from its stage; rows: its valid tokens (FULL: all 16).
template <bool FULL>
__device__ __forceinline__ void read_tile(Tile& T, const u8* st, const Args& a, int b, int shifts, int s0,
                                          int rows, int key_offset, int g, int t) {
#pragma unroll
    for (int e = 0; e < 2; e++) load_bytes<KB>(T.k[e], st + (g + 8 * e) * W + t * KB);
#pragma unroll
    for (int i = 0; i < 4; i++) load_bytes<VB>(T.v[i], st + ST_V + value_token(t, i) * VPITCH + g * VB);
    const int* tg = reinterpret_cast<const int*>(st + ST_TG);
    const u16* vs_w = reinterpret_cast<const u16*>(st + ST_VS) + (shifts & 0xff);
    const u16* vm_w = reinterpret_cast<const u16*>(st + ST_VM) + (shifts >> 8);
    T.keep = 0u;
#pragma unroll
    for (int e = 0; e < 2; e++) {
        const int r = g + 8 * e, tok = s0 + r;
        const bool ok = FULL || r < rows;
        T.grp[e] = ok ? tg[r] : -1;
#if HAS_VCH
        T.chunk[e] = ok ? reinterpret_cast<const int*>(st + ST_TC)[r] : -1;
#else
        T.chunk[e] = ok ? 0 : -1;
#endif
        T.vsc[e] = to_f32(vs_w[r]);
        T.vmn[e] = to_f32(vm_w[r]);
#if HAS_MASK
        const bool keep = ok && a.mask[b * a.smb + (long long)(key_offset + tok) * a.smn] != 0;
#else
        const bool keep = ok;
#endif
        T.keep |= (u32)keep << e;
    }
}

// The key operand of one group, for row g: B fragments (b0, b1 per k step) of q*s*2^-(p*KBITS)
// for the channels of plane p, and qm = q.m - 1024 * (sum of those fp16 values). The score mma
// then reads the key codes as "magic" fp16 (1024 + code * 2^(p*KBITS), one lop3 per register, no
// fma): the 1024 offsets add exactly 1024 * sum(B), which qm takes back once per group. The
// products are exact in the tensor core and the accumulator restarts every tile, so the offset
// costs only the low bits of 8 fp32 additions (measured: tests/test_kernels_mma.py tolerances).
__device__ __forceinline__ void group_operand(u32* b0, u32* b1, float& qm, const Args& a, int b, int h,
                                              int grp, int g, int t) {
    float part = 0.f, offset = 0.f;
    const bool row_ok = g < RT;
    const int rr = row_ok ? g : 0;
    const u16* qrow = a.q + b * a.sqb + (h * R + rr / TQ) * a.sqh + (rr % TQ) * a.sqt;
    const u16* srow = a.ks + b * a.sks_b + h * a.sks_h + (long long)grp * a.sks_g;
    const u16* mrow = a.km + b * a.sks_b + h * a.sks_h + (long long)grp * a.sks_g;
#pragma unroll
    for (int p = 0; p < KP; p++) {
        const float plane_scale = 1.f / (float)(1 << (p * KBITS));
#pragma unroll
        for (int j = 0; j < KB / 4; j++) {
            float v[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int ch = p * W + t * KB + 4 * j + i;
                float qv = row_ok ? to_f32(qrow[ch]) * a.qk_scale : 0.f;
                v[i] = qv * to_f32(srow[ch]) * plane_scale;
                part += qv * to_f32(mrow[ch]);
            }
            const u32 w0 = pack_half2(v[0], v[1]), w1 = pack_half2(v[2], v[3]);
            b0[p * (KB / 4) + j] = w0;
            b1[p * (KB / 4) + j] = w1;
            offset += half2_sum(w0) + half2_sum(w1);
        }
    }
    part -= 1024.f * offset;
    part += __shfl_xor_sync(0xffffffffu, part, 1);
    part += __shfl_xor_sync(0xffffffffu, part, 2);
    qm = part;
}

// Scores of tokens g, g+8 x rows 2t, 2t+1 (C layout) against one key group's operand. Two
// accumulator chains: one chain of KSTEPS dependent mma was the warps' longest wait (v8 profile).
__device__ __forceinline__ void tile_scores(float* c, const Tile& T, const u32* b0, const u32* b1) {
    float c2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int j = 0; j < KB / 4; j++) {
        const u32 lo0 = prmt(T.k[0][j], 0u, 0x1100u), hi0 = prmt(T.k[0][j], 0u, 0x3322u);  // token g
        const u32 lo1 = prmt(T.k[1][j], 0u, 0x1100u), hi1 = prmt(T.k[1][j], 0u, 0x3322u);  // token g+8
#pragma unroll
        for (int p = 0; p < KP; p++) {
            const int ks = p * (KB / 4) + j;
            mma16816(c2[ks & 1], unpack_plane<KBITS, true>(lo0, p), unpack_plane<KBITS, true>(lo1, p), unpack_plane<KBITS, true>(hi0, p),
                     unpack_plane<KBITS, true>(hi1, p), b0[ks], b1[ks]);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) c[i] = c2[0][i] + c2[1][i];
}

// acc[m tile] += value codes^T @ (p*s)^T over the tile's 16 tokens; pb0/pb1: B fragments.
// (The values keep the fma that removes the 1024 offset: folding it into one sum per range, as
// the scores do per tile, cost up to 2% relative error on real caches, benchmarks/NOTES.md v9.)
__device__ __forceinline__ void tile_values(float (*acc)[4], const Tile& T, u32 pb0, u32 pb1) {
#pragma unroll
    for (int bi = 0; bi < VB; bi += 2) {  // combos (p, bi) in rows g and (p, bi+1) in rows g+8
        const int wd = bi / 4, by = bi % 4;
        const u32 sel0 = (u32)((4 + by) << 8) | (u32)by, sel1 = sel0 + 0x101u;
        const u32 lo0 = prmt(T.v[0][wd], T.v[1][wd], sel0), hi0 = prmt(T.v[2][wd], T.v[3][wd], sel0);
        const u32 lo1 = prmt(T.v[0][wd], T.v[1][wd], sel1), hi1 = prmt(T.v[2][wd], T.v[3][wd], sel1);
#pragma unroll
        for (int p = 0; p < VP; p++) {
            const int u = (p * VB + bi) / 2;
            mma16816(acc[u], unpack_plane<VBITS, false>(lo0, p), unpack_plane<VBITS, false>(lo1, p), unpack_plane<VBITS, false>(hi0, p),
                     unpack_plane<VBITS, false>(hi1, p), pb0, pb1);
        }
    }
}

// Output channel of accumulator element e (0, 1: combo 2u; 2, 3: combo 2u+1) of m tile u.
__device__ __forceinline__ int acc_channel(int u, int e, int g) {
    const int c = 2 * u + (e >> 1);
    return (c / VB) * WV + g * VB + (c % VB);
}

// Smallest and largest id among the warp's valid tokens (ids < 0 mark invalid tokens).
__device__ __forceinline__ int warp_min_id(const int* id) {
    const int m = min(id[0] < 0 ? 0x7fffffff : id[0], id[1] < 0 ? 0x7fffffff : id[1]);
    return __reduce_min_sync(0xffffffffu, m);
}
__device__ __forceinline__ int warp_max_id(const int* id) { return __reduce_max_sync(0xffffffffu, max(id[0], id[1])); }

__device__ __forceinline__ float sum_over_g(float x) {  // the 8 lanes that share t
    x += __shfl_xor_sync(0xffffffffu, x, 4);
    x += __shfl_xor_sync(0xffffffffu, x, 8);
    return x + __shfl_xor_sync(0xffffffffu, x, 16);
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

    // Rows 2t and 2t+1 of this lane: running max, sum of p, sum of p * value min.
    float m_run[2] = {neg_inf(), neg_inf()}, l_run[2] = {0.f, 0.f}, pm[2] = {0.f, 0.f};
    float acc[MT][4];
#pragma unroll
    for (int u = 0; u < MT; u++) acc[u][0] = acc[u][1] = acc[u][2] = acc[u][3] = 0.f;
    // The warp's output rows live in shared memory (each lane owns the elements of its
    // accumulator fragment, so no barrier): finished value chunks are folded in there, which
    // keeps a second set of accumulators out of the registers.
    __shared__ float sm_m[WARPS][8], sm_l[WARPS][8];
    __shared__ float sm_o[WARPS][8][D];
    float* my_o = &sm_o[warp][0][0];
#if HAS_VCH
#pragma unroll
    for (int u = 0; u < MT; u++)
#pragma unroll
        for (int e = 0; e < 4; e++) my_o[(2 * t + (e & 1)) * D + acc_channel(u, e, g)] = 0.f;
    int cur_chunk = -1;
    const u16* fbase = a.vch + b * a.svch_b + h * a.svch_h;
#endif
    u32 qb0[KSTEPS], qb1[KSTEPS];
    float qm[2] = {0.f, 0.f};
    int cur_grp = -1;

    // Each warp takes a contiguous WARPS-th of the split: key groups and value chunks are runs
    // of tokens, so a warp changes group rarely.
    const int per_warp = tokens_per_split / WARPS;  // a multiple of 16 (host)
    const int w_begin = n_begin + warp * per_warp;
    const int w_end = min(w_begin + per_warp, n_end);

    __shared__ __align__(16) u8 sm_ring[WARPS][RING][STAGE_BYTES];
    u8* ring = &sm_ring[warp][0][0];
    const u32 ring_s = (u32)__cvta_generic_to_shared(ring);
    int shifts;
    Feed feed = make_feed(a, b, h, lane, w_begin, shifts);
    int s_issue = w_begin;  // the next tile to copy
#pragma unroll
    for (int i = 0; i < RING - 1; i++) {  // prologue: RING-1 tiles in flight
        if (s_issue + 16 <= w_end) issue_tile<true>(ring_s + i * STAGE_BYTES, feed, a, 16);
        else if (s_issue < w_end) issue_tile<false>(ring_s + i * STAGE_BYTES, feed, a, w_end - s_issue);
        s_issue += 16;
        cp_async_commit();
    }
    int stage = 0;
    Tile cur;
    for (int s0 = w_begin; s0 < w_end; s0 += 16) {
        {  // refill the stage consumed last iteration, then wait for this tile's stage
            const int st_next = stage == 0 ? RING - 1 : stage - 1;
            if (s_issue + 16 <= w_end) issue_tile<true>(ring_s + st_next * STAGE_BYTES, feed, a, 16);
            else if (s_issue < w_end) issue_tile<false>(ring_s + st_next * STAGE_BYTES, feed, a, w_end - s_issue);
            s_issue += 16;
            cp_async_commit();
            cp_async_wait<RING - 1>();
            __syncwarp();
            if (s0 + 16 <= w_end) read_tile<true>(cur, ring + stage * STAGE_BYTES, a, b, shifts, s0, 16, key_offset, g, t);
            else read_tile<false>(cur, ring + stage * STAGE_BYTES, a, b, shifts, s0, w_end - s0, key_offset, g, t);
            __syncwarp();  // every lane has its operands before the stage is refilled
            stage = stage == RING - 1 ? 0 : stage + 1;
        }

        // ---- scores, one pass per key group present in the tile (usually one: the current)
        float s[4] = {0.f, 0.f, 0.f, 0.f};  // (token g, row 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
        if (__all_sync(0xffffffffu, (cur.grp[0] == cur_grp || cur.grp[0] < 0) && (cur.grp[1] == cur_grp || cur.grp[1] < 0))
            && cur_grp >= 0) {
            float c[4];
            tile_scores(c, cur, qb0, qb1);
#pragma unroll
            for (int i = 0; i < 4; i++) s[i] = c[i] + qm[i & 1];  // invalid tokens: masked below
        } else {
        const int glo = warp_min_id(cur.grp), ghi = warp_max_id(cur.grp);
        for (int grp = glo; grp <= ghi; grp++) {
            if (grp != cur_grp) {
                float qm_g;
                group_operand(qb0, qb1, qm_g, a, b, h, grp, g, t);
                qm[0] = __shfl_sync(0xffffffffu, qm_g, 8 * t);      // row 2t lives in lanes 4*(2t)..
                qm[1] = __shfl_sync(0xffffffffu, qm_g, 8 * t + 4);  // row 2t+1
                cur_grp = grp;
                if (grp + 1 < n_groups) {
                    const long long off = b * a.sks_b + h * a.sks_h + (long long)(grp + 1) * a.sks_g;
                    prefetch_row(a.ks + off, lane);
                    prefetch_row(a.km + off, lane);
                }
            }
            float c[4];
            tile_scores(c, cur, qb0, qb1);
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (cur.grp[i >> 1] == grp) s[i] = c[i] + qm[i & 1];
        }
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (!((cur.keep >> (i >> 1)) & 1u)) s[i] = neg_inf();

        // ---- online softmax of rows 2t, 2t+1 (the 8 lanes of a t hold the tile's 16 tokens)
        // Lazy rescaling: the running max moves only when a score passes it by more than
        // LAZY_LOG2 (p <= 2^LAZY_LOG2 meanwhile, safe in fp16 operands and fp32 sums); the final
        // normalization uses the same max, so the result is exact.
        // The row maxima are reduced across lanes only on the rare tiles where some lane's own
        // scores pass its running max by LAZY_LOG2 (a vote instead of six shuffles per tile).
        float alpha[2] = {1.f, 1.f}, m_safe[2];
        bool rescale = false;
        const float lmx[2] = {fmaxf(s[0], s[2]), fmaxf(s[1], s[3])};
        if (__any_sync(0xffffffffu, lmx[0] > m_run[0] + LAZY_LOG2 || lmx[1] > m_run[1] + LAZY_LOG2)) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float mx = lmx[e];
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
                const bool grow = mx > m_run[e] + LAZY_LOG2;
                const float m_new = grow ? mx : m_run[e];
                m_safe[e] = m_new == neg_inf() ? 0.f : m_new;
                alpha[e] = grow ? exp2f(m_run[e] - m_safe[e]) : 1.f;
                m_run[e] = m_new;
                rescale |= grow;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 2; e++) m_safe[e] = m_run[e] == neg_inf() ? 0.f : m_run[e];
        }
        float pr[4];
#pragma unroll
        for (int i = 0; i < 4; i++) pr[i] = exp2f(s[i] - m_safe[i & 1]);
#pragma unroll
        for (int e = 0; e < 2; e++) l_run[e] = l_run[e] * alpha[e] + (pr[e] + pr[2 + e]);
        if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
            for (int e = 0; e < 2; e++) pm[e] *= alpha[e];
#pragma unroll
            for (int u = 0; u < MT; u++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[u][e] *= alpha[e & 1];
#if HAS_VCH
            if (cur_chunk >= 0) {
#pragma unroll
                for (int u = 0; u < MT; u++)
#pragma unroll
                    for (int e = 0; e < 4; e++) my_o[(2 * t + (e & 1)) * D + acc_channel(u, e, g)] *= alpha[e & 1];
            }
#endif
        }

        // ---- values: codes^T @ (p * s_n)^T + p . m_n, per channel-factor chunk
        float ps[4], pmv[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            ps[i] = pr[i] * cur.vsc[i >> 1];
            pmv[i] = pr[i] * cur.vmn[i >> 1];
        }
#if HAS_VCH
        if (__all_sync(0xffffffffu, (cur.chunk[0] == cur_chunk || cur.chunk[0] < 0) &&
                                        (cur.chunk[1] == cur_chunk || cur.chunk[1] < 0)) && cur_chunk >= 0) {
#pragma unroll
            for (int e = 0; e < 2; e++) pm[e] += pmv[e] + pmv[2 + e];  // invalid tokens have p = 0
            tile_values(acc, cur, transpose8x8(pack_half2(ps[0], ps[1])), transpose8x8(pack_half2(ps[2], ps[3])));
        } else {
        const int clo = warp_min_id(cur.chunk), chi = warp_max_id(cur.chunk);
        for (int c = clo; c <= chi; c++) {
            if (c != cur_chunk) {
                if (cur_chunk >= 0) {  // fold the finished chunk: out += f * (acc + p.m)
                    const float pt[2] = {sum_over_g(pm[0]), sum_over_g(pm[1])};
                    const u16* frow = fbase + (long long)cur_chunk * a.svch_c;
#pragma unroll
                    for (int u = 0; u < MT; u++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int ch = acc_channel(u, e, g);
                            my_o[(2 * t + (e & 1)) * D + ch] += to_f32(frow[ch]) * (acc[u][e] + pt[e & 1]);
                            acc[u][e] = 0.f;
                        }
                    pm[0] = pm[1] = 0.f;
                }
                cur_chunk = c;
                if (c + 1 < n_chunks) prefetch_row(fbase + (long long)(c + 1) * a.svch_c, lane);
            }
            float q4[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const bool in = cur.chunk[i >> 1] == c;
                q4[i] = in ? ps[i] : 0.f;
                pm[i & 1] += in ? pmv[i] : 0.f;
            }
            tile_values(acc, cur, transpose8x8(pack_half2(q4[0], q4[1])), transpose8x8(pack_half2(q4[2], q4[3])));
        }
        }
#else
#pragma unroll
        for (int e = 0; e < 2; e++) pm[e] += pmv[e] + pmv[2 + e];
        tile_values(acc, cur, transpose8x8(pack_half2(ps[0], ps[1])), transpose8x8(pack_half2(ps[2], ps[3])));
#endif
    }
    cp_async_wait<0>();  // no copy may land in shared memory after the warp moves on

    // ---- this warp's result for rows 2t, 2t+1: sm_o (+ acc + p.m), unnormalized, with m_run, l
    const float pt[2] = {sum_over_g(pm[0]), sum_over_g(pm[1])};
    const float l[2] = {sum_over_g(l_run[0]), sum_over_g(l_run[1])};
#pragma unroll
    for (int u = 0; u < MT; u++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int ch = acc_channel(u, e, g);
#if HAS_VCH
            if (cur_chunk >= 0)
                my_o[(2 * t + (e & 1)) * D + ch] +=
                    to_f32((fbase + (long long)cur_chunk * a.svch_c)[ch]) * (acc[u][e] + pt[e & 1]);
#else
            my_o[(2 * t + (e & 1)) * D + ch] = acc[u][e] + pt[e & 1];
#endif
        }

    // ---- merge the warps (shared memory) and write the split's partial
    if (g == 0) {
#pragma unroll
        for (int e = 0; e < 2; e++) { sm_m[warp][2 * t + e] = m_run[e]; sm_l[warp][2 * t + e] = l[e]; }
    }
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
