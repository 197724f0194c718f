/* CPU kernels for inference, float32, called through ctypes by native.py (which builds this file at first
 * use with -O3 -march=native): few_rows_linear and swiglu_mlps for decode, add_bias_rows for every
 * Linear, softmax_rows (attention) and gelu_tanh_inplace (the vision tower) in AVX-512 builds. Summation
 * orders differ from MKL's and the exponential is a polynomial: results agree with Paddle's kernels to
 * float32 rounding.
 *
 * few_rows_linear, y[R, N] = x[R, K] @ w[N, K]^T for a few rows R: decode multiplies one to a few
 * activation rows by every weight matrix, so a step is bound by how fast the weights stream from memory.
 * The sgemm of Paddle's bundled MKL packs the weight for every call with more than one row (the
 * 1280 x 129280 lm_head: 20 ms for 1 row, 70 ms for 2 or 4). Here each thread walks its own rows of w
 * (torch's [out, in] layout: one output's weights are contiguous) and keeps, for four outputs at a time,
 * one accumulator per (activation row, output) in registers, so every weight element is loaded once for
 * up to four rows.
 */
#include <math.h>
#include <stddef.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LANES 8
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
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
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VSUM(v) (v)
#endif

#define MAX_ROWS 4
#define OUTPUTS 4

/* Outputs n .. n + outputs - 1 for activation rows 0 .. rows - 1 (rows, outputs: compile-time after inlining). */
static inline __attribute__((always_inline)) void tile(const float *x, const float *w, float *y, long k_dim,
                                                       long n_dim, long n, const int rows, const int outputs) {
    vec acc[MAX_ROWS][OUTPUTS];
    float tail[MAX_ROWS][OUTPUTS];
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < outputs; ++j) acc[r][j] = VZERO(), tail[r][j] = 0.0f;
    const long k_main = k_dim / LANES * LANES;
    for (long k = 0; k < k_main; k += LANES) {
        vec wv[OUTPUTS];
        for (int j = 0; j < outputs; ++j) wv[j] = VLOAD(w + (n + j) * k_dim + k);
        for (int r = 0; r < rows; ++r) {
            vec xv = VLOAD(x + r * k_dim + k);
            for (int j = 0; j < outputs; ++j) acc[r][j] = VFMA(xv, wv[j], acc[r][j]);
        }
    }
    for (long k = k_main; k < k_dim; ++k)
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < outputs; ++j) tail[r][j] += x[r * k_dim + k] * w[(n + j) * k_dim + k];
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < outputs; ++j) y[r * n_dim + n + j] = VSUM(acc[r][j]) + tail[r][j];
}

#define ROWS_CASE(ROWS)                                                                    \
    case ROWS: {                                                                           \
        _Pragma("omp parallel for schedule(static)")                                       \
        for (long n = 0; n < n_main; n += OUTPUTS) tile(x, w, y, k_dim, n_dim, n, ROWS, OUTPUTS); \
        for (long n = n_main; n < n_dim; ++n) tile(x, w, y, k_dim, n_dim, n, ROWS, 1);    \
        break;                                                                             \
    }

/* At most MAX_ROWS rows: x [rows, k_dim], w [n_dim, k_dim], y [rows, n_dim]. */
static void few_rows_chunk(const float *x, const float *w, float *y, long rows, long k_dim, long n_dim) {
    const long n_main = n_dim / OUTPUTS * OUTPUTS;
    switch (rows) {
        ROWS_CASE(1)
        ROWS_CASE(2)
        ROWS_CASE(3)
        ROWS_CASE(4)
    }
}

/* x [rows, k_dim], w [n_dim, k_dim], y [rows, n_dim], all row-major float32; w is streamed once per
 * MAX_ROWS rows. */
void few_rows_linear(const float *x, const float *w, float *y, long rows, long k_dim, long n_dim) {
    for (long r0 = 0; r0 < rows; r0 += MAX_ROWS) {
        const long chunk = rows - r0 < MAX_ROWS ? rows - r0 : MAX_ROWS;
        few_rows_chunk(x + r0 * k_dim, w, y + r0 * n_dim, chunk, k_dim, n_dim);
    }
}

/* The SiLU-gated MLPs of a decode step in one call: for each MLP m and each of its rows (row_counts[m] ids
 * from row_ids, each with a weight from row_scales, both laid out MLP after MLP),
 *     out[row] += scale * down_m(silu(gate_m(x[row])) * up_m(x[row])).
 * This covers the dense MLP (every row, weight 1), the shared experts (the same) and the routed experts
 * (each with the tokens that chose it, weighted by the router). gate_m, up_m: [inter[m], hidden]; down_m:
 * [hidden, inter[m]] (torch layout). An MLP's rows are gathered and run MAX_ROWS at a time, so its weights
 * stream once per four rows. scratch holds MAX_ROWS * (2 * hidden + 3 * max(inter)) floats. */
void swiglu_mlps(const float *x, long rows, long hidden, long n_mlps, const float *const *gate,
                 const float *const *up, const float *const *down, const long *inter, const long *row_counts,
                 const long *row_ids, const float *row_scales, float *out, float *scratch) {
    long widest = 0;
    for (long m = 0; m < n_mlps; ++m) widest = inter[m] > widest ? inter[m] : widest;
    float *gathered = scratch, *down_out = scratch + MAX_ROWS * hidden;
    float *gated = down_out + MAX_ROWS * hidden, *upped = gated + MAX_ROWS * widest;
    float *hidden_act = upped + MAX_ROWS * widest;
    for (long i = 0; i < rows * hidden; ++i) out[i] = 0.0f;
    long offset = 0;
    for (long m = 0; m < n_mlps; ++m) {
        const long n_inter = inter[m];
        for (long first = 0; first < row_counts[m]; first += MAX_ROWS) {
            const long chunk = row_counts[m] - first < MAX_ROWS ? row_counts[m] - first : MAX_ROWS;
            const long *ids = row_ids + offset + first;
            const float *scales = row_scales + offset + first;
            for (long r = 0; r < chunk; ++r)
                for (long i = 0; i < hidden; ++i) gathered[r * hidden + i] = x[ids[r] * hidden + i];
            few_rows_chunk(gathered, gate[m], gated, chunk, hidden, n_inter);
            few_rows_chunk(gathered, up[m], upped, chunk, hidden, n_inter);
            for (long i = 0; i < chunk * n_inter; ++i)
                hidden_act[i] = gated[i] / (1.0f + expf(-gated[i])) * upped[i];
            few_rows_chunk(hidden_act, down[m], down_out, chunk, n_inter, hidden);
            for (long r = 0; r < chunk; ++r)
                for (long i = 0; i < hidden; ++i) out[ids[r] * hidden + i] += scales[r] * down_out[r * hidden + i];
        }
        offset += row_counts[m];
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

/* The vector width the kernels were built with: 16 on AVX-512, 8 on AVX2, 1 otherwise. */
int vector_lanes(void) { return LANES; }

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
void softmax_rows(const float *x, const float *mask, float *out, long rows, long n, long heads, long q_len,
                  long mask_batches) {
    const long n_main = n / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (n - n_main)) - 1u);
#pragma omp parallel for schedule(static)
    for (long row = 0; row < rows; ++row) {
        const float *in = x + row * n;
        float *o = out + row * n;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        if (mask) {
            const long batch = mask_batches == 1 ? 0 : row / (heads * q_len);
            const float *m = mask + (batch * q_len + row % q_len) * n;
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
        const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (long i = 0; i < n_main; i += 16) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(in + i), top));
            _mm512_storeu_ps(o + i, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        if (tail) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, in + n_main), top));
            _mm512_mask_storeu_ps(o + n_main, tail, e);
            vsum = _mm512_mask_add_ps(vsum, tail, vsum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
        for (long i = 0; i < n_main; i += 16) _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(o + i), inv));
        if (tail)
            _mm512_mask_storeu_ps(o + n_main, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, o + n_main), inv));
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
            const long left = end - i;
            const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
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
#endif
