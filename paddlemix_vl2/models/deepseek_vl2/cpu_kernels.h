/* What cpu_kernels.c, cpu_gemm.c and cpu_decode.c share: the kernels cpu_decode.c strings together,
 * the scratch allocator, the AVX-512 exponential (and its sum over a shifted row) and tail masks, one
 * softmax row, and the GEMM's interface (cpu_gemm.c), which the MLP kernels call for prefill. */
#ifndef PADDLEMIX_VL2_CPU_KERNELS_H
#define PADDLEMIX_VL2_CPU_KERNELS_H

#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdlib.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* A bfloat16 value as stored: the upper half of a float32's bits (checkpoint weights kept as read). */
typedef unsigned short bf16_t;

static inline float bf16_to_float(bf16_t value) {
    union { unsigned int bits; float f; } u = {(unsigned int)value << 16};
    return u.f;
}

/* Scratch that persists per thread, grown on demand: *buf holds at least `floats` floats (64-byte aligned)
 * afterwards, or is NULL when memory ran out. */
float *grow(float **buf, size_t *cap, size_t floats);

/* y [rows, n_dim] = x [rows, k_dim] @ w [n_dim, k_dim]^T, w float32 or (bf16) bfloat16 (cpu_kernels.c). */
void few_rows_linear(const float *x, const void *w, int bf16, float *y, long rows, long k_dim, long n_dim);

/* few_rows_linear for rows <= MAX_ROWS (4) on the calling thread (cpu_kernels.c). */
void few_rows_serial(const float *x, const void *w, int bf16, float *y, long rows, long k_dim, long n_dim);

/* y = weight * x / sqrt(mean(x^2) + eps) per row of n (y may be x) (cpu_kernels.c). */
void rms_norm_rows(const float *x, const float *weight, float *y, long rows, long n, float eps);

/* out [rows, hidden] = a layer's SiLU-gated MLPs, each over its rows with their scales (cpu_kernels.c;
 * native.swiglu_mlps documents the arguments). Returns 0, or -1 when scratch memory ran out. */
int swiglu_mlps(const float *x, long rows, long hidden, long n_mlps, const void *const *gate,
                const void *const *up, const void *const *down, int bf16, const long *inter, const long *row_counts,
                const long *row_ids, const float *row_scales, float *out);

#if defined(__AVX512F__)
/* e^x for x <= 0 to about 1e-7 relative: 2^n * e^r with r = x - n ln 2 in [-ln2/2, ln2/2] and a degree-7
 * Taylor polynomial for e^r. x below -88 is taken as -88 (e^-88 is 6e-39, a subnormal that the package's
 * flush-to-zero mode reads as 0), which also turns masked -inf scores into ~0 instead of NaN. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* out[r, :] = softmax(x[r, :] + mask row) over rows of length n (AVX-512 only; vector_lanes() says which
 * build this is); out may be x. Rows are attention scores [B, heads, q_len, n] in order; mask, when not
 * NULL, is additive [mask_batches, 1, q_len, n] (mask_batches 1 or B), added here instead of in a
 * broadcast copy of the scores' size (at a 1037-token prefill, two 43 MB buffers per layer, mostly page
 * faults). Paddle's CPU softmax runs at about 0.26 G elements/s on two threads; the ViT's 729 x 729
 * attention scores made it a fifth of the vision tower's time. */
static inline __mmask16 tail_mask(long left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* out[i] = e^(in[i] - top) for i < n (every in[i] <= top; out may be in); returns their sum. */
static inline float exp_shifted_sum(const float *in, float *out, long n, float top) {
    const __m512 vtop = _mm512_set1_ps(top);
    __m512 vsum = _mm512_setzero_ps();
    for (long i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, in + i), vtop));
        _mm512_mask_storeu_ps(out + i, m, e);
        vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
    }
    return _mm512_reduce_add_ps(vsum);
}

/* out = softmax(in + m) over one row of n (m NULL: no mask); out may be in. */
void softmax_row(const float *in, const float *m, float *o, long n);

/* The widest head (MHA) or rotary part (MLA) the decode kernels take: native.MAX_DECODE_HEAD_DIM. */
#define MAX_HEAD_DIM 512

/* dst = rope(x) * factor: x [d], cos/sin [d] (each half repeated), NeoX's rotate_half; dst may be x. */
static inline void rope_neox(const float *x, const float *cos, const float *sin, float factor, float *dst, long d) {
    const long half = d / 2;
    for (long i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        dst[i] = (x1 * cos[i] + -x2 * sin[i]) * factor;
        dst[i + half] = (x2 * cos[i + half] + x1 * sin[i + half]) * factor;
    }
}

/* One decode step of multi-head attention over the heads-first cache (cpu_kernels.c; native.mha_decode
 * documents the arguments). Returns 0, or -1 when scratch memory ran out. */
int mha_decode(const float *q, const float *k_new, const float *v_new, const float *cos, const float *sin,
               float *cache_k, float *cache_v, const float *mask, float *out, long batch, long heads,
               long kv_heads, long head_dim, long max_len, long pos, float scale);

/* A prefill's RoPE (q in place) and cache write, MHA (cpu_kernels.c; native.rope_store_prefill). */
void rope_store_prefill(float *q, const float *k, const float *v, const float *cos, const float *sin,
                        float *cache_k, float *cache_v, long batch, long tokens, long heads, long kv_heads,
                        long head_dim, long max_len, long start);

/* r[i][j] <-> r[j][i] over 16 vectors of 16 32-bit lanes (the GEMMs' packing of weights and rows). */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int j = 0; j < 4; ++j) {
        t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
        t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
    }
    for (int j = 0; j < 4; ++j) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
        r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
    }
}

#define NR 32 /* the GEMM's panel width: output columns per register tile */

/* The weights of one GEMM: W [n, k] (row stride ldw), or two stacked as [W; W2] with W's n1 rows a
 * multiple of NR (an MLP's gate and up projections, run as one GEMM over the same rows), or, with
 * k_major, W^T given as [k, n] (attention's values: C = P @ V). float32, or with bf16 bfloat16 (not
 * k_major; widened as the panels are packed, needs AVX512BW). */
typedef struct {
    const void *w, *w2;
    long ldw, n1;
    int k_major, bf16;
} gemm_weights;

typedef struct {
    float *c;
    long ldc;
    const long *c_rows;    /* output row ids, or NULL for 0 .. m - 1 */
    const float *scales;   /* one factor per output row, or NULL */
    const float *bias;     /* [n], added once, or NULL */
    int accumulate;        /* add into C instead of overwriting it */
} gemm_out;

/* Output row i of a call (a 32-column block at n0, two vectors masked by m0 / m1) written through the
 * gemm_out options: scaled by its factor, bias0 / bias1 added (zeros for none), then what the row holds
 * when add_existing. Both GEMMs (cpu_gemm.c, cpu_amx.c) write their blocks with it. */
static inline __attribute__((always_inline)) void store_out_row(const gemm_out *out, long i, long n0, __m512 v0,
                                                                __m512 v1, __m512 bias0, __m512 bias1,
                                                                __mmask16 m0, __mmask16 m1, int add_existing) {
    float *dst = out->c + (out->c_rows ? out->c_rows[i] : i) * out->ldc + n0;
    if (out->scales) {
        const __m512 s = _mm512_set1_ps(out->scales[i]);
        v0 = _mm512_mul_ps(v0, s), v1 = _mm512_mul_ps(v1, s);
    }
    v0 = _mm512_add_ps(v0, bias0), v1 = _mm512_add_ps(v1, bias1);
    if (add_existing) {
        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, dst));
        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, dst + 16));
    }
    _mm512_mask_storeu_ps(dst, m0, v0);
    _mm512_mask_storeu_ps(dst + 16, m1, v1);
}

/* out = A[m, k] @ W[n, k]^T through the gemm_out options, on max_threads threads; A's rows through a_rows
 * when not NULL. Returns 0, or -1 when scratch memory ran out (nothing is written then). */
int gemm_nt_rows(const float *a, long lda, const long *a_rows, const gemm_weights *weights, long m, long n, long k,
                 const gemm_out *out, int max_threads);

/* gemm_nt_rows on AMX tiles for bfloat16 weights (cpu_amx.c): returns 0, -1 when scratch memory ran out, or
 * 1 when it does not run (no AMX in this build, Linux refused the AMX state, float32 or k-major weights),
 * leaving the work to the AVX-512 GEMM. */
int amx_gemm_nt_rows(const float *a, long lda, const long *a_rows, const gemm_weights *weights, long m, long n,
                     long k, const gemm_out *out, int max_threads);
#endif

/* Switches the AMX GEMM on or off (on by default); returns whether it runs from now on (cpu_amx.c). */
int amx_gemm_enable(int enabled);

#endif
