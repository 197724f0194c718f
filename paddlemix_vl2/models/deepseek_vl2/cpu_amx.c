/* gemm_nt_rows on AMX tiles, for bfloat16 weights (CPUs with AMX-BF16, e.g. Xeon Sapphire Rapids on).
 *
 * AMX multiplies bfloat16 pairs and accumulates in float32, but the activations are float32. Each is split
 * into three bfloat16 parts, a = a1 + a2 + a3, by truncation: a1 keeps a's upper 16 bits, a2 the upper 16
 * bits of a - a1 and a3 the rest, 8 significant bits each, so the sum is a exactly (unless a3 falls below
 * float32's normal range, |a| < 1e-33, where AMX reads it as zero). A bfloat16 weight times a part is exact
 * in float32, so C = A1 W^T + A2 W^T + A3 W^T is the float32 product up to the order of the float32 sums,
 * as with any GEMM. With three tile products per block this ran 1.4-2.6x as fast as the AVX-512 GEMM on the
 * model's shapes (2 vCPUs of a Xeon with AMX: 690 against 270 GFLOP/s on the ViT's fc1 for one tile).
 *
 * Layout: C in blocks of 32 x 32 (four 16 x 16 float32 accumulator tiles), K in steps of 32. A's rows are
 * split and packed per chunk of CHUNK_ROWS rows, each part row-major with K padded to a multiple of 32
 * (tiles read 16 rows x 64 bytes); W's 32-column panels are packed pair-interleaved ("VNNI": row kp of a
 * tile holds w[n][2kp], w[n][2kp+1] for its 16 columns n). Each thread owns a range of panels, as in the
 * AVX-512 GEMM, and writes its blocks through the same output options (row ids, scales, bias, accumulate).
 */
#include "cpu_kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AMX_TILE__) && \
    defined(__AMX_BF16__)
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define CHUNK_ROWS 256
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    unsigned char palette_id, start_row, reserved[14];
    unsigned short colsb[16];
    unsigned char rows[16];
} tile_config;

static _Atomic int amx_wanted = 1;  /* set from Python while another thread may multiply */

/* Linux hands out AMX state only to processes that ask for it; asked once. */
static int amx_permitted(void) {
    static int state = -1;
    int permitted;
#pragma omp critical(amx_permission)
    {
        if (state < 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
        permitted = state;
    }
    return permitted;
}

static void load_tile_config(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* The upper halves of 16 float32 bit patterns as 16 bfloat16. */
static inline __m256i upper_halves(__m512 v) {
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
}

/* Rows i0 .. i0 + rows - 1 of A (row ids through a_rows), split into three parts, each [CHUNK_ROWS, kp]
 * bfloat16 (kp = k padded to 32; zeros past k, and past the last row up to the next 32-row block, the last
 * rows the tiles read). An infinite value stays whole in a1 (inf - inf would make the other parts NaN), so
 * the products give what the AVX-512 GEMM gives. */
static void split_rows(const float *a, long lda, const long *a_rows, long i0, long rows, long k, long kp,
                       bf16_t *parts) {
    const __m512i upper = _mm512_set1_epi32((int)0xffff0000u);
#pragma omp for schedule(static)
    for (long i = 0; i < (rows + 31) / 32 * 32; ++i) {
        bf16_t *p1 = parts + i * kp, *p2 = p1 + CHUNK_ROWS * kp, *p3 = p2 + CHUNK_ROWS * kp;
        if (i >= rows) {
            memset(p1, 0, kp * sizeof(bf16_t)), memset(p2, 0, kp * sizeof(bf16_t)), memset(p3, 0, kp * sizeof(bf16_t));
            continue;
        }
        const float *row = a + (a_rows ? a_rows[i0 + i] : i0 + i) * lda;
        for (long c = 0; c < kp; c += 16) {
            const __mmask16 m = c < k ? tail_mask(k - c) : 0;
            const __m512 v = _mm512_maskz_loadu_ps(m, row + c);
            const __m512 v1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), upper));
            const __mmask16 finite = ~_mm512_fpclass_ps_mask(v, 0x18);  /* 0x08 +inf, 0x10 -inf */
            const __m512 r1 = _mm512_maskz_sub_ps(finite, v, v1);
            const __m512 v2 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r1), upper));
            const __m512 r2 = _mm512_sub_ps(r1, v2);
            _mm256_storeu_si256((__m256i *)(p1 + c), upper_halves(v1));
            _mm256_storeu_si256((__m256i *)(p2 + c), upper_halves(v2));
            _mm256_storeu_si256((__m256i *)(p3 + c), upper_halves(r2));
        }
    }
}

/* Global weight row n (a stacked [W; W2] pair is read through its two halves), or NULL past n_dim. */
static inline const bf16_t *weight_row(const gemm_weights *w, long n, long n_dim) {
    if (n >= n_dim) return NULL;
    if (w->w2 && n >= w->n1) return (const bf16_t *)w->w2 + (n - w->n1) * w->ldw;
    return (const bf16_t *)w->w + n * w->ldw;
}

/* W rows n0 .. n0 + 31 pair-interleaved into two tiles per K step: tile (ks, t) holds at row kp2 the 16
 * pairs w[n0 + 16 t + j][32 ks + 2 kp2 .. + 1], j = 0 .. 15 (zeros past n_dim and k). A pair is 32 bits, so
 * per tile this is a 16 x 16 transpose of 32-bit units: columns' 64-byte runs in, pair rows out. */
static void pack_panel(const gemm_weights *w, long n_dim, long n0, long k, long kp, bf16_t *dst) {
    const bf16_t *rows[32];
    for (int col = 0; col < 32; ++col) rows[col] = weight_row(w, n0 + col, n_dim);
    for (long ks = 0; ks < kp / 32; ++ks) {
        const long c = ks * 32;
        const __mmask32 m = c < k ? (k - c >= 32 ? 0xffffffffu : (1u << (k - c)) - 1) : 0;
        for (int t = 0; t < 2; ++t) {
            __m512 r[16];
            for (int j = 0; j < 16; ++j) {
                const bf16_t *row = rows[16 * t + j];
                r[j] = row ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, row + c)) : _mm512_setzero_ps();
            }
            transpose16(r);
            bf16_t *tile = dst + (ks * 2 + t) * 512;
            for (int pair = 0; pair < 16; ++pair) _mm512_store_ps((float *)(tile + pair * 32), r[pair]);
        }
    }
}

/* Writes a 32 x 32 block (acc, row stride 32) through the output options: rows i0.., columns n0.. of which
 * `rows` and `cols` are real. The whole reduction is in acc, so this is the AVX-512 GEMM's first and only
 * K block: scale, then bias, then (accumulate) the existing values. */
static void write_block(const float *acc, const gemm_out *out, long i0, long rows, long n0, long cols) {
    const __mmask16 m0 = tail_mask(cols), m1 = cols > 16 ? tail_mask(cols - 16) : 0;
    const __m512 bias0 = out->bias ? _mm512_maskz_loadu_ps(m0, out->bias + n0) : _mm512_setzero_ps();
    const __m512 bias1 = out->bias ? _mm512_maskz_loadu_ps(m1, out->bias + n0 + 16) : _mm512_setzero_ps();
    for (long i = 0; i < rows; ++i)
        store_out_row(out, i0 + i, n0, _mm512_loadu_ps(acc + i * 32), _mm512_loadu_ps(acc + i * 32 + 16), bias0,
                      bias1, m0, m1, out->accumulate);
}

/* One 32 x 32 block of C over the whole reduction: tiles 0-3 accumulate, 4-5 hold one part's two row
 * tiles, 6-7 the panel's two column tiles. */
static void block_product(const bf16_t *parts, long kp, long i_local, const bf16_t *panel, float *acc) {
    const size_t part_stride = (size_t)CHUNK_ROWS * kp, row_bytes = kp * sizeof(bf16_t);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (long ks = 0; ks < kp / 32; ++ks) {
        _tile_loadd(6, panel + ks * 1024, 64);
        _tile_loadd(7, panel + ks * 1024 + 512, 64);
        for (int part = 0; part < 3; ++part) {
            const bf16_t *top = parts + part * part_stride + i_local * kp + ks * 32;
            _tile_loadd(4, top, row_bytes);
            _tile_loadd(5, top + 16 * kp, row_bytes);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, acc, 128);
    _tile_stored(1, acc + 16, 128);
    _tile_stored(2, acc + 16 * 32, 128);
    _tile_stored(3, acc + 16 * 32 + 16, 128);
}

/* Per thread: each worker's packed panel; the calling thread's split rows, which its team shares. */
static _Thread_local bf16_t *panel_buf, *parts_buf;
static _Thread_local size_t panel_cap, parts_cap;

int amx_gemm_enable(int enabled) {
    amx_wanted = enabled;
    return enabled && amx_permitted();
}

int amx_gemm_nt_rows(const float *a, long lda, const long *a_rows, const gemm_weights *weights, long m, long n,
                     long k, const gemm_out *out, int max_threads) {
    if (!amx_wanted || !weights->bf16 || weights->k_major || !amx_permitted()) return 1;
    const long kp = (k + 31) / 32 * 32, panels = (n + 31) / 32;
    bf16_t *parts = (bf16_t *)grow((float **)&parts_buf, &parts_cap, (3 * (size_t)CHUNK_ROWS * kp + 1) / 2);
    if (!parts) return -1;
    int failed = 0; /* shared: a thread without its panel buffer stops them all before anything is written */
#pragma omp parallel num_threads(max_threads)
    {
        const int thread = omp_get_thread_num(), threads = omp_get_num_threads();
        const long p_lo = panels * thread / threads, p_hi = panels * (thread + 1) / threads;
        bf16_t *panel = (bf16_t *)grow((float **)&panel_buf, &panel_cap, (size_t)kp * 16);
        float acc[32 * 32];
        if (!panel) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        int stop;
#pragma omp atomic read
        stop = failed;
        if (!stop) {
            load_tile_config();
            for (long i0 = 0; i0 < m; i0 += CHUNK_ROWS) {
                const long rows = m - i0 < CHUNK_ROWS ? m - i0 : CHUNK_ROWS;
                split_rows(a, lda, a_rows, i0, rows, k, kp, parts);  /* ends with the omp for's barrier */
                for (long p = p_lo; p < p_hi; ++p) {
                    pack_panel(weights, n, p * 32, k, kp, panel);
                    const long cols = n - p * 32 < 32 ? n - p * 32 : 32;
                    for (long i = 0; i < rows; i += 32) {
                        block_product(parts, kp, i, panel, acc);
                        write_block(acc, out, i0 + i, rows - i < 32 ? rows - i : 32, p * 32, cols);
                    }
                }
#pragma omp barrier
            }
            _tile_release();
        }
    }
    return failed ? -1 : 0;
}
#else
int amx_gemm_enable(int enabled) {
    (void)enabled;
    return 0;
}

#if defined(__AVX512F__)
int amx_gemm_nt_rows(const float *a, long lda, const long *a_rows, const gemm_weights *weights, long m, long n,
                     long k, const gemm_out *out, int max_threads) {
    (void)a, (void)lda, (void)a_rows, (void)weights, (void)m, (void)n, (void)k, (void)out, (void)max_threads;
    return 1;
}
#endif
#endif
