/* The GEMM of the CPU kernels (AVX-512 builds): see cpu_kernels.h for the interface. */
#include "cpu_kernels.h"

#if defined(__AVX512F__)
/* ---- gemm_nt: C = A @ W^T for many rows (prefill, the vision tower), AVX-512 ----
 *
 * Paddle's bundled MKL (2019) runs fp32 sgemm here at about 230-250 GFLOP/s on large shapes and 70-110 on
 * the MoE experts' ~100-row blocks, where the machine's FMA units allow about 400 (numpy's OpenBLAS
 * reaches that). This is the usual blocked GEMM: W is packed k-major in 32-column panels (a 16 x 16
 * register transpose, since W is [N, K] with K contiguous), A in 12-row slivers (transposed the same
 * way), and a 12 x 32 register-tile micro-kernel (24 accumulators) broadcasts A against two vectors of W,
 * or one for a last panel of at most 16 columns. Each thread owns a
 * contiguous range of output columns and packs only its own panels; A is packed once per K block by all
 * threads together.
 *
 * The same call gathers A's rows and scatters C's rows through index lists, with a scale per output row
 * and an accumulate mode, so a MoE expert runs on the tokens that chose it without a gather or scatter
 * copy, its router weight applied as it is written. */
#define MR 12
/* The reduction runs in equal blocks of at most KC_MAX (256 measured best of 256, 384 and 512 on the
 * Xeon, 2 MB L2), each thread keeping the packed panels of NC output columns in its L2 at once. */
#define KC_MAX 256
/* bfloat16 weights take the AMX GEMM where there is one (cpu_amx.c) from one full 32-row tile block on;
 * fewer rows would leave its tiles part empty. */
#define AMX_MIN_ROWS 32
#define NC 768

static _Thread_local float *a_pack_buf, *b_pack_buf;
static _Thread_local size_t a_pack_cap, b_pack_cap;

/* 16 consecutive weights from w + offset under mask m, widened to float32 when the weights are bfloat16
 * (the packed panels are float32 either way, so the micro-kernel is the same). */
static inline __m512 load_weights(const void *w, int bf16, long offset, __mmask16 m) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    if (bf16) {
        const __m256i bits = _mm256_maskz_loadu_epi16(m, (const bf16_t *)w + offset);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
#endif
    return _mm512_maskz_loadu_ps(m, (const float *)w + offset);
}

/* Columns 0 .. kc - 1 of 16 rows (row i from rows[i], float32 or with bf16 bfloat16; NULL reads as zeros)
 * into dst[k * stride + i] for the lanes i in `lanes`, 16 columns at a time by a register transpose. */
static void transpose_rows(const void *const rows[16], int bf16, long kc, float *dst, long stride, __mmask16 lanes) {
    for (long kk = 0; kk < kc; kk += 16) {
        const long left = kc - kk;
        const __mmask16 m = tail_mask(left);
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = rows[i] ? load_weights(rows[i], bf16, kk, m) : _mm512_setzero_ps();
        transpose16(r);
        const long count = left >= 16 ? 16 : left;
        for (long c = 0; c < count; ++c) _mm512_mask_storeu_ps(dst + (kk + c) * stride, lanes, r[c]);
    }
}

/* W rows n0 .. n0 + 31 (zeros past n_dim), columns k0 .. k0 + kc - 1, into dst[k * NR + j]. */
static void pack_w_panel(const gemm_weights *weights, long n_dim, long n0, long k0, long kc, float *dst) {
    if (weights->k_major) {
        const long cols = n_dim - n0;
        const __mmask16 m0 = tail_mask(cols), m1 = cols > 16 ? tail_mask(cols - 16) : 0;
        for (long k = 0; k < kc; ++k) {
            const float *row = (const float *)weights->w + (k0 + k) * weights->ldw + n0;
            _mm512_store_ps(dst + k * NR, _mm512_maskz_loadu_ps(m0, row));
            _mm512_store_ps(dst + k * NR + 16, _mm512_maskz_loadu_ps(m1, row + 16));
        }
        return;
    }
    const char *w = weights->w;
    if (weights->w2 && n0 >= weights->n1) w = weights->w2, n0 -= weights->n1, n_dim -= weights->n1;
    const long row_bytes = weights->ldw * (weights->bf16 ? (long)sizeof(bf16_t) : (long)sizeof(float));
    const long column_bytes = k0 * (weights->bf16 ? (long)sizeof(bf16_t) : (long)sizeof(float));
    for (int half = 0; half < (n_dim - n0 > 16 ? 2 : 1); ++half) {  /* a narrow micro tile reads one half */
        const void *rows[16];
        for (int i = 0; i < 16; ++i) {
            const long n = n0 + 16 * half + i;
            rows[i] = n < n_dim ? w + n * row_bytes + column_bytes : NULL;
        }
        transpose_rows(rows, weights->bf16, kc, dst + 16 * half, NR, 0xffff);
    }
}

/* A rows i0 .. i0 + MR - 1 (row ids through a_rows when not NULL; zeros past m), columns k0 .. k0 + kc - 1,
 * into dst[k * MR + i], by the register transpose of W's panels (its 16 rows the 12 of A and 4 of zeros):
 * a scalar copy made packing A cost about half of attention's P V, where k is the 729 keys and n only a
 * head's 72 values. */
static void pack_a_sliver(const float *a, long lda, const long *a_rows, long m, long i0, long k0, long kc,
                          float *dst) {
    const void *rows[16] = {NULL};
    for (int i = 0; i < MR && i0 + i < m; ++i) rows[i] = a + (a_rows ? a_rows[i0 + i] : i0 + i) * lda + k0;
    transpose_rows(rows, 0, kc, dst, MR, (1u << MR) - 1);
}

/* One tile of `rows` x NR: output rows i0 .. i0 + rows - 1, columns n0 .. (masked). rows and `wide` are
 * constants after inlining, so a sliver's last rows cost no multiplies of padding, and a last panel of at
 * most 16 columns (wide = 0) multiplies by its first vector only: attention's P V over heads of 72 would
 * otherwise spend a quarter of its multiplies on the third panel's padding. */
static inline __attribute__((always_inline)) void micro_tile(long kc, const float *a, const float *b,
                                                             const gemm_out *out, long i0, const int rows,
                                                             const int wide, long n0, __mmask16 m0, __mmask16 m1,
                                                             int first) {
    __m512 acc[MR][2];
    for (int i = 0; i < rows; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long k = 0; k < kc; ++k) {
        const __m512 b0 = _mm512_load_ps(b + k * NR), b1 = wide ? _mm512_load_ps(b + k * NR + 16) : b0;
        for (int i = 0; i < rows; ++i) {
            const __m512 ai = _mm512_set1_ps(a[k * MR + i]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            if (wide) acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    const __m512 bias0 = first && out->bias ? _mm512_maskz_loadu_ps(m0, out->bias + n0) : _mm512_setzero_ps();
    const __m512 bias1 = first && out->bias ? _mm512_maskz_loadu_ps(m1, out->bias + n0 + 16) : _mm512_setzero_ps();
    const int add_existing = !first || out->accumulate;
    for (int i = 0; i < rows; ++i)
        store_out_row(out, i0 + i, n0, acc[i][0], acc[i][1], bias0, bias1, m0, m1, add_existing);
}

#define TILE_CASE(ROWS) \
    case ROWS: \
        if (m1) micro_tile(kc, a, b, out, i0, ROWS, 1, n0, m0, m1, first); \
        else micro_tile(kc, a, b, out, i0, ROWS, 0, n0, m0, m1, first); \
        break;

static void micro_kernel(long kc, const float *a, const float *b, const gemm_out *out, long i0, long rows, long n0,
                         __mmask16 m0, __mmask16 m1, int first) {
    switch (rows) {
        TILE_CASE(12) TILE_CASE(11) TILE_CASE(10) TILE_CASE(9) TILE_CASE(8) TILE_CASE(7)
        TILE_CASE(6) TILE_CASE(5) TILE_CASE(4) TILE_CASE(3) TILE_CASE(2) TILE_CASE(1)
    }
}

/* out = A[m, k] @ W[n, k]^T through the gemm_out options, on max_threads threads. Returns 0, or -1 when
 * scratch memory ran out (nothing is written then). */
int gemm_nt_rows(const float *a, long lda, const long *a_rows, const gemm_weights *weights, long m, long n,
                        long k, const gemm_out *out, int max_threads) {
    if (m >= AMX_MIN_ROWS) {
        const int status = amx_gemm_nt_rows(a, lda, a_rows, weights, m, n, k, out, max_threads);
        if (status <= 0) return status;
    }
    const long slivers = (m + MR - 1) / MR, panels = (n + NR - 1) / NR;
    const long k_blocks = (k + KC_MAX - 1) / KC_MAX, kc_even = (k + k_blocks - 1) / k_blocks;
    float *a_pack = grow(&a_pack_buf, &a_pack_cap, (size_t)slivers * MR * KC_MAX);
    float *b_packs = grow(&b_pack_buf, &b_pack_cap, (size_t)max_threads * KC_MAX * NC);
    if (!a_pack || !b_packs) return -1;
#pragma omp parallel num_threads(max_threads)
    {
        const int thread = omp_get_thread_num(), threads = omp_get_num_threads();
        const long p_lo = panels * thread / threads, p_hi = panels * (thread + 1) / threads;
        float *b_pack = b_packs + (size_t)thread * KC_MAX * NC;
        for (long k0 = 0; k0 < k; k0 += kc_even) {
            const long kc = k - k0 < kc_even ? k - k0 : kc_even;
#pragma omp for schedule(static)
            for (long s = 0; s < slivers; ++s) pack_a_sliver(a, lda, a_rows, m, s * MR, k0, kc, a_pack + s * MR * kc);
            for (long pj = p_lo; pj < p_hi; pj += NC / NR) {
                const long pj_end = pj + NC / NR < p_hi ? pj + NC / NR : p_hi;
                for (long p = pj; p < pj_end; ++p)
                    pack_w_panel(weights, n, p * NR, k0, kc, b_pack + (p - pj) * kc * NR);
                for (long s = 0; s < slivers; ++s) {
                    const long rows = m - s * MR < MR ? m - s * MR : MR;
                    for (long p = pj; p < pj_end; ++p) {
                        const long cols = n - p * NR;
                        const __mmask16 m0 = tail_mask(cols), m1 = cols > 16 ? tail_mask(cols - 16) : 0;
                        micro_kernel(kc, a_pack + s * MR * kc, b_pack + (p - pj) * kc * NR, out, s * MR, rows,
                                     p * NR, m0, m1, k0 == 0);
                    }
                }
            }
#pragma omp barrier
        }
    }
    return 0;
}

/* Softmax attention through the GEMM for many queries (the vision tower, LM prefill). Tensors are read in
 * place through strides: per token (ld), per head (head) and per sequence (seq). Queries run in blocks of
 * QUERY_BLOCK rows, each (sequence, head, block) on one thread: scores = scale * Q K^T over the keys the
 * block may see, softmax row by row with the mask row added, out = P V (V read as a k-major weight). With
 * `causal`, query i sees keys 0 .. key_offset + i only (a block stops at its last row's), which skips the
 * masked half of a prefill's products; the mask still decides within that range. */
#define QUERY_BLOCK 96

typedef struct {
    const float *q, *k, *v, *mask;
    float *out;
    long q_ld, q_head, q_seq, k_ld, k_head, k_seq, v_ld, v_head, v_seq, out_ld, out_head, out_seq, mask_ld, mask_seq;
    long sequences, heads, group, q_len, kv_len, key_dim, value_dim, key_offset;
    int causal;
    float scale;
} attention_args;

static _Thread_local float *attention_buf;
static _Thread_local size_t attention_cap;

static int attention(const attention_args *a) {
    const long blocks = (a->q_len + QUERY_BLOCK - 1) / QUERY_BLOCK, tasks = a->sequences * a->heads * blocks;
    int failed = 0;
    /* Round-robin, so the causal blocks' growing key ranges even out; not schedule(dynamic): Paddle's
     * libiomp5 lacks the GOMP_loop_nonmonotonic_* entry points GCC emits for it, and the library would
     * not load. */
#pragma omp parallel for schedule(static, 1) reduction(| : failed)
    for (long task = 0; task < tasks; ++task) {
        const long sequence = task / (a->heads * blocks), head = task / blocks % a->heads;
        const long first = task % blocks * QUERY_BLOCK;
        const long rows = a->q_len - first < QUERY_BLOCK ? a->q_len - first : QUERY_BLOCK;
        const long keys = a->causal ? a->key_offset + first + rows : a->kv_len;
        float *scores = grow(&attention_buf, &attention_cap, (size_t)QUERY_BLOCK * keys + QUERY_BLOCK);
        if (!scores) {
            failed = 1;
            continue;
        }
        float *scales = scores + QUERY_BLOCK * keys;
        for (long i = 0; i < rows; ++i) scales[i] = a->scale;
        const float *q = a->q + sequence * a->q_seq + head * a->q_head + first * a->q_ld;
        const long kv_head = head / a->group;
        const gemm_weights key_weights = {a->k + sequence * a->k_seq + kv_head * a->k_head, NULL, a->k_ld, 0, 0, 0};
        const gemm_weights value_weights = {a->v + sequence * a->v_seq + kv_head * a->v_head, NULL, a->v_ld, 0, 1, 0};
        const gemm_out to_scores = {scores, keys, NULL, scales, NULL, 0};
        const gemm_out to_out = {a->out + sequence * a->out_seq + head * a->out_head + first * a->out_ld, a->out_ld,
                                 NULL, NULL, NULL, 0};
        failed |= gemm_nt_rows(q, a->q_ld, NULL, &key_weights, rows, keys, a->key_dim, &to_scores, 1);
        for (long i = 0; i < rows; ++i) {
            const float *mask = a->mask ? a->mask + sequence * a->mask_seq + (first + i) * a->mask_ld : NULL;
            softmax_row(scores + i * keys, mask, scores + i * keys, keys);
        }
        failed |= gemm_nt_rows(scores, keys, NULL, &value_weights, rows, a->value_dim, keys, &to_out, 1);
    }
    return failed ? -1 : 0;
}

/* The vision tower's attention (bidirectional, no mask) straight from its fused q/k/v projection: qkv
 * [sequences, tokens, 3 * width] (q, k and v side by side, heads side by side within each), out
 * [sequences, tokens, width] with the heads side by side, as the output projection takes them: no head
 * split, stack or concat copies. Returns 0, or -1 when scratch memory ran out. */
int attention_qkv(const float *qkv, float *out, long sequences, long tokens, long width, long heads, float scale) {
    const long head_dim = width / heads, ld = 3 * width;
    const attention_args args = {
        qkv, qkv + width, qkv + 2 * width, NULL, out,
        ld, head_dim, tokens * ld, ld, head_dim, tokens * ld, ld, head_dim, tokens * ld, width, head_dim,
        tokens * width, 0, 0,
        sequences, heads, 1, tokens, tokens, head_dim, head_dim, 0, 0, scale,
    };
    return attention(&args);
}

/* Causal prefill attention of the language model: q [B, T, heads, Dk] (rotated), keys [B, kv_heads,
 * key_len, Dk] and values [B, kv_heads, key_len, Dv] (heads first), or with tokens_first [B, key_len,
 * kv_heads, Dk] and [B, key_len, kv_heads, Dv], holding positions 0 .. start + T - 1; mask additive
 * [B, 1, T, mask_len]; out [B, T, heads, Dv]. The MHA model passes its heads-first cache (key_len =
 * mask_len = the cache's length, Dk = Dv); MLA its keys [k_nope | k_pe] and values expanded from the
 * compressed cache by kv_b_proj, tokens first (Dk = nope + rope, Dv = value). Query i reads keys
 * 0 .. start + i. Returns 0 or -1. */
int attention_prefill(const float *q, const float *keys, const float *values, const float *mask, float *out,
                      long batch, long heads, long kv_heads, long q_len, long key_len, long mask_len, long key_dim,
                      long value_dim, long start, int tokens_first, float scale) {
    const long q_ld = heads * key_dim, out_ld = heads * value_dim;
    /* Per position and per head: heads first, a head's positions are consecutive rows; tokens first, a
     * position's heads are. */
    const long k_ld = tokens_first ? kv_heads * key_dim : key_dim, k_head = tokens_first ? key_dim : key_len * key_dim;
    const long v_ld = tokens_first ? kv_heads * value_dim : value_dim;
    const long v_head = tokens_first ? value_dim : key_len * value_dim;
    const attention_args args = {
        q, keys, values, mask, out,
        q_ld, key_dim, q_len * q_ld, k_ld, k_head, kv_heads * key_len * key_dim,
        v_ld, v_head, kv_heads * key_len * value_dim,
        out_ld, value_dim, q_len * out_ld, mask_len, q_len * mask_len,
        batch, heads, heads / kv_heads, q_len, start + q_len, key_dim, value_dim, start, 1, scale,
    };
    return attention(&args);
}

/* C[m, n] (row stride ldc) = A[m, k] @ W[n, k]^T (+ bias[n]); all row-major float32 except W when bf16
 * (bfloat16). */
int gemm_nt(const float *a, long lda, const void *w, int bf16, long ldw, const float *bias, float *c, long ldc,
            long m, long n, long k) {
    const gemm_out out = {c, ldc, NULL, NULL, bias, 0};
    const gemm_weights weights = {w, NULL, ldw, 0, 0, bf16};
    return gemm_nt_rows(a, lda, NULL, &weights, m, n, k, &out, omp_get_max_threads());
}
#endif
