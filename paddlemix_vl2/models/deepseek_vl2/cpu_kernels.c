/* CPU kernels for inference, float32 arithmetic (weights in float32 or bfloat16), called through ctypes by
 * native.py (which builds this file and cpu_gemm.c at first use with -O3 -march=native): few_rows_linear
 * for one to eight rows, swiglu_mlps (a layer's MLPs in one call; prefill's through the GEMM of
 * cpu_gemm.c), add_bias_rows, rms_norm_rows, and in AVX-512 builds softmax_rows (attention),
 * gelu_tanh_inplace (the vision tower) and mha_decode (a decode step's attention). Summation orders differ
 * from MKL's and the exponential is a polynomial: results agree with Paddle's kernels to float32 rounding.
 *
 * few_rows_linear, y[R, N] = x[R, K] @ w[N, K]^T for a few rows R: decode multiplies one to a few
 * activation rows by every weight matrix, so a step is bound by how fast the weights stream from memory.
 * The sgemm of Paddle's bundled MKL packs the weight for every call with more than one row (the
 * 1280 x 129280 lm_head: 20 ms for 1 row, 70 ms for 2 or 4). Here each thread walks its own rows of w
 * (torch's [out, in] layout: one output's weights are contiguous) and keeps, for four outputs at a time,
 * one accumulator per (activation row, output) in registers, so every weight element is loaded once for
 * up to four rows.
 */
#include "cpu_kernels.h"

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VLOAD_BF16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VLOAD_BF16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float VSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#define LANES 1
typedef float vec;
#define VZERO() 0.0f
#define VLOAD(p) (*(p))
#define VLOAD_BF16(p) bf16_to_float(*(p))
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VSUM(v) (v)
#endif

/* Weights i .. i + LANES - 1 of w (weight_at: weight i) as float32, w float32 or, when bf16, bfloat16 (bf16
 * is a compile-time constant after inlining). */
static inline __attribute__((always_inline)) vec weight_vec(const void *w, long i, const int bf16) {
    return bf16 ? VLOAD_BF16((const bf16_t *)w + i) : VLOAD((const float *)w + i);
}

static inline __attribute__((always_inline)) float weight_at(const void *w, long i, const int bf16) {
    return bf16 ? bf16_to_float(((const bf16_t *)w)[i]) : ((const float *)w)[i];
}

#define MAX_ROWS 4
/* native.MAX_FEW_ROWS: up to this many rows an MLP streams its weights (few_rows_chunk) */
#define MAX_FEW_ROWS 8
#define OUTPUTS 4

/* Outputs n .. n + outputs - 1 for activation rows 0 .. rows - 1 (rows, outputs, bf16: compile-time after
 * inlining). */
static inline __attribute__((always_inline)) void tile(const float *x, const void *w, float *y, long k_dim,
                                                       long n_dim, long n, const int rows, const int outputs,
                                                       const int bf16) {
    vec acc[MAX_ROWS][OUTPUTS];
    float tail[MAX_ROWS][OUTPUTS];
    const long element = bf16 ? sizeof(bf16_t) : sizeof(float);
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < outputs; ++j) acc[r][j] = VZERO(), tail[r][j] = 0.0f;
    const long k_main = k_dim / LANES * LANES;
    for (long k = 0; k < k_main; k += LANES) {
        vec wv[OUTPUTS];
        for (int j = 0; j < outputs; ++j) {
            /* The next tile's weights, one tile (4 x k_dim) ahead, into L2: with two to four rows the FMAs
             * keep fewer loads in flight, and the lm_head streamed at 27-30 GB/s without this, 32-34 with
             * it (one row: 33-34 either way). */
            __builtin_prefetch((const char *)w + ((n + outputs + j) * k_dim + k) * element, 0, 1);
            wv[j] = weight_vec(w, (n + j) * k_dim + k, bf16);
        }
        for (int r = 0; r < rows; ++r) {
            vec xv = VLOAD(x + r * k_dim + k);
            for (int j = 0; j < outputs; ++j) acc[r][j] = VFMA(xv, wv[j], acc[r][j]);
        }
    }
    for (long k = k_main; k < k_dim; ++k)
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < outputs; ++j)
                tail[r][j] += x[r * k_dim + k] * weight_at(w, (n + j) * k_dim + k, bf16);
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < outputs; ++j) y[r * n_dim + n + j] = VSUM(acc[r][j]) + tail[r][j];
}

#define ROWS_CASE(ROWS, BF16)                                                                                 \
    case ROWS:                                                                                               \
        for (long n = n_begin; n < n_main; n += OUTPUTS) tile(x, w, y, k_dim, n_dim, n, ROWS, OUTPUTS, BF16); \
        for (long n = n_main; n < n_end; ++n) tile(x, w, y, k_dim, n_dim, n, ROWS, 1, BF16);                  \
        break;

/* Outputs n_begin .. n_end - 1 of at most MAX_ROWS rows, on the calling thread: x [rows, k_dim],
 * w [n_dim, k_dim] (float32, or bfloat16 when bf16), y [rows, n_dim]. */
static void few_rows_span(const float *x, const void *w, int bf16, float *y, long rows, long k_dim, long n_dim,
                          long n_begin, long n_end) {
    const long n_main = n_begin + (n_end - n_begin) / OUTPUTS * OUTPUTS;
    if (bf16) {
        switch (rows) { ROWS_CASE(1, 1) ROWS_CASE(2, 1) ROWS_CASE(3, 1) ROWS_CASE(4, 1) }
    } else {
        switch (rows) { ROWS_CASE(1, 0) ROWS_CASE(2, 0) ROWS_CASE(3, 0) ROWS_CASE(4, 0) }
    }
}

/* few_rows_span over all n_dim outputs, split between the threads. */
static void few_rows_chunk(const float *x, const void *w, int bf16, float *y, long rows, long k_dim, long n_dim) {
#pragma omp parallel
    {
        const long thread = omp_get_thread_num(), threads = omp_get_num_threads(), tiles = n_dim / OUTPUTS;
        const long begin = tiles * thread / threads * OUTPUTS;
        const long end = thread == threads - 1 ? n_dim : tiles * (thread + 1) / threads * OUTPUTS;
        few_rows_span(x, w, bf16, y, rows, k_dim, n_dim, begin, end);
    }
}

/* Scratch that persists per thread (the caller's and OpenMP's workers), grown on demand: fresh buffers of
 * megabytes would be mmapped and page-faulted on every call. NULL when memory ran out. */
float *grow(float **buf, size_t *cap, size_t floats) {
    if (floats > *cap) {
        free(*buf);
        *buf = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        *cap = *buf ? floats : 0;
    }
    return *buf;
}

/* x [rows, k_dim], w [n_dim, k_dim], y [rows, n_dim], row-major, float32 except w when bf16 (bfloat16
 * storage, widened to float32 as it is loaded); w is streamed once per MAX_ROWS rows. */
void few_rows_linear(const float *x, const void *w, int bf16, float *y, long rows, long k_dim, long n_dim) {
    for (long r0 = 0; r0 < rows; r0 += MAX_ROWS) {
        const long chunk = rows - r0 < MAX_ROWS ? rows - r0 : MAX_ROWS;
        few_rows_chunk(x + r0 * k_dim, w, bf16, y + r0 * n_dim, chunk, k_dim, n_dim);
    }
}

/* y[r, :] += bias for rows of length n, in place. Paddle's CPU add broadcasts the bias at about a tenth of
 * this speed ([729, 4304] + [4304]: 5.4 ms against 0.5 ms in place), which cost the ViT's Linear layers
 * about 1.4 s for five tiles. */
void add_bias_rows(float *y, const float *bias, long rows, long n) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; ++r) {
        float *row = y + r * n;
#pragma omp simd
        for (long i = 0; i < n; ++i) row[i] += bias[i];
    }
}

/* y[r, :] = weight * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)): the official RMSNorm in float32 (normalise,
 * then scale), y may be x. A tiny-model decode step has 25 norms of one row: Paddle's fused kernel took
 * 12 us a call alone and an eighth of the step's Python and Paddle time in place (py-spy), for about 1 us
 * of arithmetic. The threads are only woken for many rows. */
static void rms_norm_row(const float *x, const float *weight, float *y, long n, float eps) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (long i = 0; i < n; ++i) sum += x[i] * x[i];
    const float scale = 1.0f / sqrtf(sum / (float)n + eps);
#pragma omp simd
    for (long i = 0; i < n; ++i) y[i] = weight[i] * (x[i] * scale);
}

void rms_norm_rows(const float *x, const float *weight, float *y, long rows, long n, float eps) {
    if (rows <= MAX_FEW_ROWS) {
        for (long r = 0; r < rows; ++r) rms_norm_row(x + r * n, weight, y + r * n, n, eps);
        return;
    }
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; ++r) rms_norm_row(x + r * n, weight, y + r * n, n, eps);
}

/* The vector width the kernels were built with: 16 on AVX-512, 8 on AVX2, 1 otherwise. */
int vector_lanes(void) { return LANES; }

/* out[:n] = silu(g[:n]) * u[:n] (out may be g), with silu(g) = g / (1 + e^-g) written as g e^g / (1 + e^g)
 * for g < 0, so the exponential only sees non-positive arguments. */
static void silu_mul(const float *g, const float *u, float *out, long n) {
#if defined(__AVX512F__)
    for (long i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        const __m512 v = _mm512_maskz_loadu_ps(m, g + i);
        const __m512 z = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));
        const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 numerator = _mm512_mask_mul_ps(v, negative, v, z);
        const __m512 silu = _mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.0f), z));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, u + i)));
    }
#else
    for (long i = 0; i < n; ++i) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
#endif
}

/* Whether every kernel that takes weights also takes them in bfloat16: the GEMM's bf16 packing loads
 * 16-bit lanes under a mask, an AVX512BW instruction. */
int bf16_weights(void) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__)
/* One row: out = softmax(in + m) (m NULL for no mask); out may be in. */
void softmax_row(const float *in, const float *m, float *o, long n) {
    const long n_main = n / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (n - n_main)) - 1u);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    if (m) {
        for (long i = 0; i < n_main; i += 16) {
            const __m512 v = _mm512_add_ps(_mm512_loadu_ps(in + i), _mm512_loadu_ps(m + i));
            _mm512_storeu_ps(o + i, v);
            vmax = _mm512_max_ps(vmax, v);
        }
        if (tail) {
            const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(tail, in + n_main),
                                           _mm512_maskz_loadu_ps(tail, m + n_main));
            _mm512_mask_storeu_ps(o + n_main, tail, v);
            vmax = _mm512_mask_max_ps(vmax, tail, vmax, v);
        }
        in = o;
    } else {
        for (long i = 0; i < n_main; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(in + i));
        if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, in + n_main));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / exp_shifted_sum(in, o, n, _mm512_reduce_max_ps(vmax)));
    for (long i = 0; i < n_main; i += 16) _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(o + i), inv));
    if (tail) _mm512_mask_storeu_ps(o + n_main, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, o + n_main), inv));
}

void softmax_rows(const float *x, const float *mask, float *out, long rows, long n, long heads, long q_len,
                  long mask_batches) {
#pragma omp parallel for schedule(static)
    for (long row = 0; row < rows; ++row) {
        const long batch = mask_batches == 1 ? 0 : row / (heads * q_len);
        softmax_row(x + row * n, mask ? mask + (batch * q_len + row % q_len) * n : NULL, out + row * n, n);
    }
}

/* The tanh-approximate GELU of n values, in place: 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3),
 * written as x / (1 + e^(-2u)) and, for u < 0, x e^(2u) / (1 + e^(2u)), so the exponential only sees
 * non-positive arguments. Paddle's CPU gelu runs at about 0.33 G values/s; the ViT's fc1 output is
 * 3.1 M values per tile per layer. */
void gelu_tanh_inplace(float *x, long n) {
    const long block = 4096;
    const long n_blocks = (n + block - 1) / block;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < n_blocks; ++b) {
        const long end = (b + 1) * block < n ? (b + 1) * block : n;
        for (long i = b * block; i < end; i += 16) {
            const __mmask16 m = tail_mask(end - i);
            const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
            const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
            const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                           _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), cube, v));
            const __m512 z = exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-2.0f), _mm512_abs_ps(u)));
            const __m512 denominator = _mm512_add_ps(_mm512_set1_ps(1.0f), z);
            const __mmask16 negative = _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LT_OQ);
            const __m512 numerator = _mm512_mask_mul_ps(v, negative, v, z);
            _mm512_mask_storeu_ps(x + i, m, _mm512_div_ps(numerator, denominator));
        }
    }
}

/* ---- mha_decode: one decode step of multi-head attention (the tiny model's), AVX-512 ----
 *
 * For each of B sequences, one new token at cache position pos: RoPE (NeoX rotate_half, cos/sin of the
 * whole head) on its query and key, the key and value written into the heads-first cache [B, kv_heads,
 * max_len, D], then per query head softmax(scale * q.K^T + mask) @ V over positions 0 .. pos (later ones
 * are masked anyway: not written yet). In Paddle this is about fifteen ops per layer (RoPE, two cache
 * writes, transposes, two matmuls, softmax) whose dispatch cost more than the cache reads themselves. */
static _Thread_local float *scores_buf;
static _Thread_local size_t scores_cap;

/* One token's keys and values (k, v [kv_heads, D], cos/sin [D]) into the heads-first cache of sequence b at
 * position pos: the keys rotated. */
static void store_token_kv(const float *k, const float *v, const float *cos, const float *sin, float *cache_k,
                           float *cache_v, long b, long kv_heads, long head_dim, long max_len, long pos) {
    for (long g = 0; g < kv_heads; ++g) {
        const long slot = ((b * kv_heads + g) * max_len + pos) * head_dim;
        rope_neox(k + g * head_dim, cos, sin, 1.0f, cache_k + slot, head_dim);
        for (long i = 0; i < head_dim; ++i) cache_v[slot + i] = v[g * head_dim + i];
    }
}

/* q [B, heads, D], k_new and v_new [B, kv_heads, D], cos/sin [B, D], cache_k/cache_v [B, kv_heads, max_len, D],
 * mask additive [B, max_len] (the step's row of the [B, 1, 1, max_len] mask), out [B, heads, D]. Returns 0,
 * or -1 when scratch memory ran out (the cache is written either way). */
int mha_decode(const float *q, const float *k_new, const float *v_new, const float *cos, const float *sin,
               float *cache_k, float *cache_v, const float *mask, float *out, long batch, long heads,
               long kv_heads, long head_dim, long max_len, long pos, float scale) {
    for (long b = 0; b < batch; ++b)
        store_token_kv(k_new + b * kv_heads * head_dim, v_new + b * kv_heads * head_dim, cos + b * head_dim,
                       sin + b * head_dim, cache_k, cache_v, b, kv_heads, head_dim, max_len, pos);
    const long keys = pos + 1, group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *scores = grow(&scores_buf, &scores_cap, (size_t)keys);
        failed = scores == NULL;
#pragma omp for schedule(static)
        for (long bh = 0; bh < batch * heads; ++bh) {
            if (!scores) continue;
            const long b = bh / heads, g = (bh % heads) / group;
            const float *k_cache = cache_k + (b * kv_heads + g) * max_len * head_dim;
            const float *v_cache = cache_v + (b * kv_heads + g) * max_len * head_dim;
            float query[MAX_HEAD_DIM], acc[MAX_HEAD_DIM];
            rope_neox(q + bh * head_dim, cos + b * head_dim, sin + b * head_dim, scale, query, head_dim);
            for (long s = 0; s < keys; ++s) {
                __m512 dot = _mm512_setzero_ps();
                for (long i = 0; i < head_dim; i += 16) {
                    const __mmask16 m = tail_mask(head_dim - i);
                    dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, query + i),
                                          _mm512_maskz_loadu_ps(m, k_cache + s * head_dim + i), dot);
                }
                scores[s] = _mm512_reduce_add_ps(dot);
            }
            softmax_row(scores, mask + b * max_len, scores, keys);
            for (long i = 0; i < head_dim; ++i) acc[i] = 0.0f;
            for (long s = 0; s < keys; ++s) {
                const __m512 p = _mm512_set1_ps(scores[s]);
                for (long i = 0; i < head_dim; i += 16) {
                    const __mmask16 m = tail_mask(head_dim - i);
                    const __m512 value = _mm512_maskz_loadu_ps(m, v_cache + s * head_dim + i);
                    _mm512_mask_storeu_ps(acc + i, m, _mm512_fmadd_ps(p, value, _mm512_maskz_loadu_ps(m, acc + i)));
                }
            }
            for (long i = 0; i < head_dim; ++i) out[bh * head_dim + i] = acc[i];
        }
    }
    return failed ? -1 : 0;
}

/* A prefill's RoPE and cache write (MHA): q [B, T, heads, D] rotated in place; k and v [B, T, kv_heads, D]
 * written into cache_k / cache_v [B, kv_heads, max_len, D] at positions start .. start + T - 1, k rotated;
 * cos/sin [B, T, D]. In Paddle this was about a dozen ops a layer (q and k each expanded, rotated and
 * summed, then a transposing copy into the cache): 0.43 s of the tiny model's 3.6 s 1037-token prefill. */
void rope_store_prefill(float *q, const float *k, const float *v, const float *cos, const float *sin,
                        float *cache_k, float *cache_v, long batch, long tokens, long heads, long kv_heads,
                        long head_dim, long max_len, long start) {
#pragma omp parallel for schedule(static)
    for (long bt = 0; bt < batch * tokens; ++bt) {
        const long b = bt / tokens, t = bt % tokens;
        const float *c = cos + bt * head_dim, *s = sin + bt * head_dim;
        for (long h = 0; h < heads; ++h) {
            float *row = q + (bt * heads + h) * head_dim;
            rope_neox(row, c, s, 1.0f, row, head_dim);
        }
        store_token_kv(k + bt * kv_heads * head_dim, v + bt * kv_heads * head_dim, c, s, cache_k, cache_v, b,
                       kv_heads, head_dim, max_len, start + t);
    }
}

/* For each of `rows` rows: g[r, :n] = silu(g[r, :n]) * u[r, :n] (row strides ld). */
static void silu_mul_rows(float *g, const float *u, long rows, long n, long ld) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; ++r) silu_mul(g + r * ld, u + r * ld, g + r * ld, n);
}

/* Rows of one MLP by the GEMM, GEMM_CHUNK rows at a time: out[ids[r]] += scales[r] * down(silu(gate(x[ids[r]]))
 * * up(x[ids[r]])). gate and up run as one GEMM into a chunk's [rows, 2 * inter] scratch when inter is a
 * multiple of the panel width (one packing of the rows, one thread team). Returns 0, or -1 when scratch
 * memory ran out. */
#define GEMM_CHUNK 384
static _Thread_local float *mlp_buf;
static _Thread_local size_t mlp_cap;

static int swiglu_gemm(const float *x, long hidden, const void *gate, const void *up, const void *down, int bf16,
                       long inter, long count, const long *ids, const float *scales, float *out) {
    float *gated = grow(&mlp_buf, &mlp_cap, (size_t)2 * GEMM_CHUNK * inter);
    if (!gated) return -1;
    const int fused = inter % NR == 0;
    const long ld = fused ? 2 * inter : inter;
    float *upped = fused ? gated + inter : gated + (size_t)GEMM_CHUNK * inter;
    const gemm_weights both = {gate, up, hidden, inter, 0, bf16}, gate_only = {gate, NULL, hidden, 0, 0, bf16};
    const gemm_weights up_only = {up, NULL, hidden, 0, 0, bf16}, down_weights = {down, NULL, inter, 0, 0, bf16};
    for (long first = 0; first < count; first += GEMM_CHUNK) {
        const long chunk = count - first < GEMM_CHUNK ? count - first : GEMM_CHUNK;
        const gemm_out to_gated = {gated, ld, NULL, NULL, NULL, 0}, to_upped = {upped, ld, NULL, NULL, NULL, 0};
        const gemm_out to_out = {out, hidden, ids + first, scales + first, NULL, 1};
        const int threads = omp_get_max_threads();
        if (fused ? gemm_nt_rows(x, hidden, ids + first, &both, chunk, 2 * inter, hidden, &to_gated, threads)
                  : gemm_nt_rows(x, hidden, ids + first, &gate_only, chunk, inter, hidden, &to_gated, threads)
                        || gemm_nt_rows(x, hidden, ids + first, &up_only, chunk, inter, hidden, &to_upped, threads))
            return -1;
        silu_mul_rows(gated, upped, chunk, inter, ld);
        if (gemm_nt_rows(gated, ld, NULL, &down_weights, chunk, hidden, inter, &to_out, threads)) return -1;
    }
    return 0;
}
#endif

void few_rows_serial(const float *x, const void *w, int bf16, float *y, long rows, long k_dim, long n_dim) {
    few_rows_span(x, w, bf16, y, rows, k_dim, n_dim, 0, n_dim);
}

/* One MLP over its few rows, MAX_ROWS at a time, its weighted output added to acc [rows of x, hidden];
 * each matrix product by `linear` (few_rows_chunk: split between the threads; few_rows_serial: on the
 * calling thread). scratch: MAX_ROWS * (2 * hidden + 3 * inter) floats. */
static void few_rows_mlp(const float *x, long hidden, const void *gate, const void *up, const void *down, int bf16,
                         long inter, long count, const long *ids, const float *scales, float *acc, float *scratch,
                         void (*linear)(const float *, const void *, int, float *, long, long, long)) {
    float *gathered = scratch, *down_out = scratch + MAX_ROWS * hidden;
    float *gated = down_out + MAX_ROWS * hidden, *upped = gated + MAX_ROWS * inter, *act = upped + MAX_ROWS * inter;
    for (long first = 0; first < count; first += MAX_ROWS) {
        const long chunk = count - first < MAX_ROWS ? count - first : MAX_ROWS;
        for (long r = 0; r < chunk; ++r)
            for (long i = 0; i < hidden; ++i) gathered[r * hidden + i] = x[ids[first + r] * hidden + i];
        linear(gathered, gate, bf16, gated, chunk, hidden, inter);
        linear(gathered, up, bf16, upped, chunk, hidden, inter);
        silu_mul(gated, upped, act, chunk * inter);
        linear(act, down, bf16, down_out, chunk, inter, hidden);
        for (long r = 0; r < chunk; ++r)
            for (long i = 0; i < hidden; ++i)
                acc[ids[first + r] * hidden + i] += scales[first + r] * down_out[r * hidden + i];
    }
}

static _Thread_local float *thread_buf, *partials_buf;
static _Thread_local size_t thread_cap, partials_cap;

/* The MLPs that `take` (row counts 1..MAX_FEW_ROWS) dealt out whole to the threads, largest first to the
 * least loaded; each thread sums into its own buffer, and the buffers into out. Returns 0 or -1. */
static int dealt_few_row_mlps(const float *x, long rows, long hidden, long n_mlps, const void *const *gate,
                              const void *const *up, const void *const *down, int bf16, const long *inter,
                              const long *row_counts, const long *offsets, const long *row_ids,
                              const float *row_scales, const char *take, long *owner, size_t scratch_floats,
                              int teams, float *out) {
    double load[64] = {0};
    for (long m = 0; m < n_mlps; ++m) owner[m] = -1;
    for (;;) {
        long largest = -1;
        double largest_cost = -1.0;
        for (long m = 0; m < n_mlps; ++m) {
            const double cost = (double)inter[m] * ((row_counts[m] + MAX_ROWS - 1) / MAX_ROWS);
            if (take[m] && owner[m] < 0 && cost > largest_cost) largest = m, largest_cost = cost;
        }
        if (largest < 0) break;
        int least = 0;
        for (int t = 1; t < teams; ++t) least = load[t] < load[least] ? t : least;
        owner[largest] = least;
        load[least] += largest_cost;
    }
    float *partials = grow(&partials_buf, &partials_cap, (size_t)teams * rows * hidden);
    if (!partials) return -1;
    int failed = 0;
#pragma omp parallel num_threads(teams) reduction(| : failed)
    {
        const int thread = omp_get_thread_num();
        float *acc = partials + (size_t)thread * rows * hidden;
        float *scratch = grow(&thread_buf, &thread_cap, scratch_floats);
        for (long i = 0; i < rows * hidden; ++i) acc[i] = 0.0f;
        failed = scratch == NULL;
        for (long m = 0; m < n_mlps && scratch; ++m)
            if (owner[m] == thread)
                few_rows_mlp(x, hidden, gate[m], up[m], down[m], bf16, inter[m], row_counts[m],
                             row_ids + offsets[m], row_scales + offsets[m], acc, scratch, few_rows_serial);
    }
    if (failed) return -1;
    for (int t = 0; t < teams; ++t)
        for (long i = 0; i < rows * hidden; ++i) out[i] += partials[(size_t)t * rows * hidden + i];
    return 0;
}

/* SiLU-gated MLPs in one call: for each MLP m and each of its rows (row_counts[m] ids from row_ids, each
 * with a weight from row_scales, both laid out MLP after MLP),
 *     out[row] += scale * down_m(silu(gate_m(x[row])) * up_m(x[row])).
 * This covers the dense MLP (every row, weight 1), the shared experts (the same) and the routed experts
 * (each with the tokens that chose it, weighted by the router). gate_m, up_m: [inter[m], hidden]; down_m:
 * [hidden, inter[m]] (torch layout).
 *
 * An MLP with more than MAX_FEW_ROWS rows (prefill; AVX-512 builds only, the caller checks) runs through
 * the GEMM. The others (decode) stream their weights once per four rows: a lone one split between the
 * threads by outputs; several dealt out whole to the threads (dealt_few_row_mlps), so a decode step's MoE
 * runs without a thread barrier and each thread reads long runs of weights (on the tiny model a layer's
 * 8 MLPs x 3 matrices of 4.6 MB, read at 28-29 GB/s by 24 parallel regions split by outputs, where one
 * whole matrix streams at 32). Returns 0, or -1 when scratch memory ran out. */
int swiglu_mlps(const float *x, long rows, long hidden, long n_mlps, const void *const *gate,
                const void *const *up, const void *const *down, int bf16, const long *inter, const long *row_counts,
                const long *row_ids, const float *row_scales, float *out) {
    long widest = 0, few_row_mlps = 0;
    long *offsets = malloc((2 * n_mlps + 1) * sizeof(long) + n_mlps);
    if (!offsets) return -1;
    long *owner = offsets + n_mlps + 1;
    char *take = (char *)(owner + n_mlps);
    offsets[0] = 0;
    for (long m = 0; m < n_mlps; ++m) {
        offsets[m + 1] = offsets[m] + row_counts[m];
        widest = inter[m] > widest ? inter[m] : widest;
        take[m] = row_counts[m] > 0 && row_counts[m] <= MAX_FEW_ROWS;
        few_row_mlps += take[m];
    }
    for (long i = 0; i < rows * hidden; ++i) out[i] = 0.0f;
    int status = 0;
#if defined(__AVX512F__)
    for (long m = 0; m < n_mlps && !status; ++m)
        if (row_counts[m] > MAX_FEW_ROWS)
            status = swiglu_gemm(x, hidden, gate[m], up[m], down[m], bf16, inter[m], row_counts[m],
                                 row_ids + offsets[m], row_scales + offsets[m], out);
#endif
    const int teams = omp_get_max_threads() < 64 ? omp_get_max_threads() : 64;
    const size_t scratch_floats = MAX_ROWS * (2 * hidden + 3 * widest);
    if (!status && few_row_mlps > 1 && teams > 1) {
        status = dealt_few_row_mlps(x, rows, hidden, n_mlps, gate, up, down, bf16, inter, row_counts, offsets, row_ids,
                                    row_scales, take, owner, scratch_floats, teams, out);
    } else if (!status && few_row_mlps > 0) {
        float *scratch = grow(&thread_buf, &thread_cap, scratch_floats);
        for (long m = 0; m < n_mlps && scratch; ++m)
            if (take[m])
                few_rows_mlp(x, hidden, gate[m], up[m], down[m], bf16, inter[m], row_counts[m],
                             row_ids + offsets[m], row_scales + offsets[m], out, scratch, few_rows_chunk);
        status = scratch ? 0 : -1;
    }
    free(offsets);
    return status;
}
