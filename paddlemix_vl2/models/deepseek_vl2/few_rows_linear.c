/* y[R, N] = x[R, K] @ w[N, K]^T for a few rows R: the weight streamed once per four rows.
 *
 * Decode multiplies one to a few activation rows by every weight matrix, so a step is bound by how fast
 * the weights stream from memory. The sgemm of Paddle's bundled MKL packs the weight for every call with
 * more than one row (the 1280 x 129280 lm_head: 20 ms for 1 row, 70 ms for 2 or 4), so a batch of four
 * cost almost four single steps. Here each thread walks its own rows of w (torch's [out, in] layout: one
 * output's weights are contiguous) and keeps, for four outputs at a time, one accumulator per
 * (activation row, output) in registers, so every weight element is loaded once for up to four rows.
 *
 * Built at first use by native.py with -O3 -march=native; float32 only; summation order differs from
 * MKL's (results agree to float32 rounding).
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

/* out[R, H] = sum over m of scale[m] * down_m(silu(gate_m(x)) * up_m(x)) for x [R, H], R <= MAX_ROWS:
 * the SiLU-gated MLPs of a decode step (the dense MLP, the shared experts, one token's routed experts
 * weighted by the router) in one call. gate_m, up_m: [inter[m], H]; down_m: [H, inter[m]] (torch layout).
 * scratch holds 3 * R * max(inter[m]) + R * H floats. */
void swiglu_mlps(const float *x, long rows, long hidden, long n_mlps, const float *const *gate,
                 const float *const *up, const float *const *down, const long *inter, const float *scale,
                 float *out, float *scratch) {
    long widest = 0;
    for (long m = 0; m < n_mlps; ++m) widest = inter[m] > widest ? inter[m] : widest;
    float *gated = scratch, *upped = scratch + rows * widest, *hidden_act = upped + rows * widest;
    float *down_out = hidden_act + rows * widest;
    for (long i = 0; i < rows * hidden; ++i) out[i] = 0.0f;
    for (long m = 0; m < n_mlps; ++m) {
        const long n_inter = inter[m];
        few_rows_chunk(x, gate[m], gated, rows, hidden, n_inter);
        few_rows_chunk(x, up[m], upped, rows, hidden, n_inter);
        for (long i = 0; i < rows * n_inter; ++i)
            hidden_act[i] = gated[i] / (1.0f + expf(-gated[i])) * upped[i];
        few_rows_chunk(hidden_act, down[m], down_out, rows, n_inter, hidden);
        for (long i = 0; i < rows * hidden; ++i) out[i] += scale[m] * down_out[i];
    }
}
