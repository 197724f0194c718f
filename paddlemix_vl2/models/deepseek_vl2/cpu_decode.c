/* A decode step's decoder layers in one call, one new token per sequence (one to eight sequences):
 * mlp_block_decode, a layer's MLP part (a MoE with its router: the logits, the choice of experts by the
 * rules of moe.route in route_rows, the chosen and shared experts through swiglu_mlps; or a dense MLP);
 * mha_layer_decode, a whole decoder layer with multi-head attention (the tiny model's): RMSNorm, the q/k/v
 * projections, mha_decode, o_proj, the residual, RMSNorm, the MLP block, the residual; mla_layer_decode,
 * the same with multi-head latent attention (the small and full models'), whose attention is
 * mla_decode_attention, absorbed, over the compressed cache (its own notes below); and decode_step, which
 * runs a model's whole step from the token ids to the final norm.
 *
 * Why: per layer and step the Python path made about thirty Paddle and NumPy calls (predicates, norms,
 * projections, the gate's matmul, softmax and top-k, host copies, a sort, the expert lists, residual adds)
 * which, with the weights streaming through the caches between them, took about a millisecond, for
 * arithmetic that takes microseconds. The norms, products, attention and experts are the kernels the
 * module path calls; the router's logits come from few_rows_linear instead of Paddle's matmul and its
 * softmax from expf, so the two paths agree to float32 rounding.
 *
 * Ties: a top-k here takes the lower index among equal values. Paddle's and torch's top-k order ties their
 * own ways, so the three agree whenever the k-th and (k+1)-th values differ. Exact ties come from the 0
 * that marks the experts of dropped groups (noaux_tc's biased scores below it, or K above the kept
 * experts) and from scores that round to the same float (a saturated sigmoid). */
#include "cpu_kernels.h"

#include <float.h>
#include <string.h>

enum { GREEDY = 0, GROUP_LIMITED_GREEDY = 1, NOAUX_TC = 2 };

/* The routing rules of one MoE layer, as native.RouterConfig lays them out. */
typedef struct {
    long n_experts, top_k, n_group, topk_group;
    int sigmoid, method, norm_topk_prob;
    float routed_scaling_factor;
    const float *e_score_correction_bias; /* [n_experts] for noaux_tc, else NULL */
} router_config;

/* The k largest of values[0 .. n - 1] into picked (descending; the lower index among equals); taken [n]
 * is scratch. */
static void top_k(const float *values, long n, long k, long *picked, char *taken) {
    memset(taken, 0, (size_t)n);
    for (long j = 0; j < k; ++j) {
        long best = -1;
        for (long e = 0; e < n; ++e)
            if (!taken[e] && (best < 0 || values[e] > values[best])) best = e;
        taken[best] = 1;
        picked[j] = best;
    }
}

/* One token: logits [E] -> topk_idx [K], topk_weight [K]; scratch holds G longs, 3 E + G floats, then E
 * bytes. The sizes fit (DeepseekV2Config._check_routing): 1 <= K <= E, G divides E, 1 <= topk_group <= G,
 * and groups of at least two for noaux_tc. */
static void route_row(const float *logits, const router_config *cfg, long *topk_idx, float *topk_weight,
                      void *scratch) {
    const long n = cfg->n_experts, k = cfg->top_k;
    long *kept_groups = scratch;
    float *scores = (float *)(kept_groups + cfg->n_group), *choice = scores + n, *masked = choice + n;
    float *group_scores = masked + n;
    char *taken = (char *)(group_scores + cfg->n_group);
    if (cfg->sigmoid) {
        for (long e = 0; e < n; ++e) scores[e] = 1.0f / (1.0f + expf(-logits[e]));
    } else {
        float top = -FLT_MAX, sum = 0.0f;
        for (long e = 0; e < n; ++e) top = logits[e] > top ? logits[e] : top;
        for (long e = 0; e < n; ++e) sum += scores[e] = expf(logits[e] - top);
        for (long e = 0; e < n; ++e) scores[e] /= sum;
    }
    for (long e = 0; e < n; ++e)
        choice[e] = cfg->method == NOAUX_TC ? scores[e] + cfg->e_score_correction_bias[e] : scores[e];
    if (cfg->method == GREEDY) {
        memcpy(masked, choice, (size_t)n * sizeof(float));
    } else {
        /* A group scores its best expert (group_limited_greedy) or its best two (noaux_tc); experts outside
         * the topk_group best groups count 0. */
        const long size = n / cfg->n_group;
        long picked[2];
        for (long g = 0; g < cfg->n_group; ++g) {
            top_k(choice + g * size, size, cfg->method == NOAUX_TC ? 2 : 1, picked, taken);
            group_scores[g] = choice[g * size + picked[0]];
            if (cfg->method == NOAUX_TC) group_scores[g] += choice[g * size + picked[1]];
        }
        top_k(group_scores, cfg->n_group, cfg->topk_group, kept_groups, taken);
        memset(masked, 0, (size_t)n * sizeof(float));
        for (long j = 0; j < cfg->topk_group; ++j)
            memcpy(masked + kept_groups[j] * size, choice + kept_groups[j] * size, (size_t)size * sizeof(float));
    }
    top_k(masked, n, k, topk_idx, taken);
    float sum = 0.0f;
    for (long j = 0; j < k; ++j) {
        /* noaux_tc's bias only steers the choice: its weights are the unbiased scores. */
        topk_weight[j] = cfg->method == NOAUX_TC ? scores[topk_idx[j]] : masked[topk_idx[j]];
        sum += topk_weight[j];
    }
    const int normalise = k > 1 && cfg->norm_topk_prob;
    for (long j = 0; j < k; ++j)
        topk_weight[j] = (normalise ? topk_weight[j] / (sum + 1e-20f) : topk_weight[j]) * cfg->routed_scaling_factor;
}

/* logits [rows, E] -> topk_idx [rows, K] int64, topk_weight [rows, K] float32. Returns 0, or -1 when
 * scratch memory ran out. */
int route_rows(const float *logits, long rows, const router_config *cfg, long *topk_idx, float *topk_weight) {
    void *scratch = malloc((size_t)cfg->n_group * sizeof(long) +
                           (size_t)(3 * cfg->n_experts + cfg->n_group) * sizeof(float) + (size_t)cfg->n_experts);
    if (!scratch) return -1;
    for (long r = 0; r < rows; ++r)
        route_row(logits + r * cfg->n_experts, cfg, topk_idx + r * cfg->top_k, topk_weight + r * cfg->top_k, scratch);
    free(scratch);
    return 0;
}

/* A layer's MLP part as native_decode.MLPBlock lays it out: routed experts chosen by a router (router_weight
 * [E, H] float32; table entries 0 .. E - 1) and, when shared, one MLP over every row (table entry E: the
 * shared experts, or with E = 0 and no router a dense MLP). The table (gate, up, down, their widths inter;
 * all float32 or all bfloat16 as bf16) is native.MLPTable's. */
typedef struct {
    const float *router_weight;
    router_config router;
    const void *const *gate, *const *up, *const *down;
    const long *inter;
    int bf16, shared;
} mlp_block;

/* out [rows, H] = the block on x [rows, H], rows <= MAX_FEW_ROWS; a router's choices go to topk_idx and
 * topk_weight [rows, K]. Returns 0, or -1 when scratch memory ran out. */
int mlp_block_decode(const mlp_block *block, const float *x, long rows, long hidden, long *topk_idx,
                     float *topk_weight, float *out) {
    const router_config *cfg = &block->router;
    const long n = cfg->n_experts, pairs = rows * cfg->top_k, mlps = pairs + block->shared;
    float *logits = malloc((size_t)(rows * n + pairs + rows) * sizeof(float));
    long *counts = calloc((size_t)n + 1, sizeof(long));
    long *lists = malloc((size_t)(3 * mlps + pairs + rows) * sizeof(long));
    const void **pointers = malloc((size_t)(3 * mlps) * sizeof(void *));
    int status = logits && counts && lists && pointers ? 0 : -1;
    if (!status && n > 0) {
        few_rows_linear(x, block->router_weight, 0, logits, rows, hidden, n);
        status = route_rows(logits, rows, cfg, topk_idx, topk_weight);
    }
    if (!status) {
        /* (row, slot) pairs grouped by expert in ascending order, each group in pair order, as
         * DeepseekV2MoE._experts_native lists them; then the shared MLP over every row. counts[e] becomes
         * the next free slot of expert e's group. */
        float *row_scales = logits + rows * n;
        long *mlp_ids = lists, *row_counts = lists + mlps, *widths = lists + 2 * mlps, *row_ids = lists + 3 * mlps;
        for (long p = 0; p < pairs; ++p) counts[topk_idx[p]]++;
        long used = 0, offset = 0;
        for (long e = 0; e < n; ++e) {
            if (!counts[e]) continue;
            mlp_ids[used] = e, row_counts[used] = counts[e], ++used;
            offset += counts[e], counts[e] = offset - counts[e];
        }
        for (long p = 0; p < pairs; ++p) {
            const long slot = counts[topk_idx[p]]++;
            row_ids[slot] = p / cfg->top_k;
            row_scales[slot] = topk_weight[p];
        }
        if (block->shared) {
            mlp_ids[used] = n, row_counts[used] = rows, ++used;
            for (long r = 0; r < rows; ++r) row_ids[pairs + r] = r, row_scales[pairs + r] = 1.0f;
        }
        for (long m = 0; m < used; ++m) {
            pointers[m] = block->gate[mlp_ids[m]], pointers[mlps + m] = block->up[mlp_ids[m]];
            pointers[2 * mlps + m] = block->down[mlp_ids[m]];
            widths[m] = block->inter[mlp_ids[m]];
        }
        status = swiglu_mlps(x, rows, hidden, used, pointers, pointers + mlps, pointers + 2 * mlps, block->bf16,
                             widths, row_counts, row_ids, row_scales, out);
    }
    free(logits), free(counts), free(lists), free(pointers);
    return status;
}

#if defined(__AVX512F__)
enum { Q, K, V, O };

/* One MHA decoder layer as native_decode.MHALayer lays it out: the projections' weights [out, in]
 * (float32, or bfloat16 where proj_bf16; no biases, as in every DeepSeek-VL2 checkpoint), the layer's
 * heads-first cache [B, kv_heads, max_len, head_dim] and its MLP block. */
typedef struct {
    long hidden, heads, kv_heads, head_dim, max_len;
    float eps, scale;
    const float *input_norm, *post_norm;
    const void *proj[4];
    int proj_bf16[4];
    float *cache_k, *cache_v;
    const mlp_block *mlp;
} mha_layer;

static _Thread_local float *layer_buf;
static _Thread_local size_t layer_cap;

/* A layer's second half: h [rows, H] (the attention's output) += x, then out = h + the MLP block on
 * RMSNorm(h) (normed and mlp_out [rows, H] scratch; out may be x). */
static int mlp_residuals(const mlp_block *mlp, const float *x, float *h, float *normed, float *mlp_out, long rows,
                         long hidden, const float *post_norm, float eps, long *topk_idx, float *topk_weight,
                         float *out) {
    for (long i = 0; i < rows * hidden; ++i) h[i] += x[i];
    rms_norm_rows(h, post_norm, normed, rows, hidden, eps);
    if (mlp_block_decode(mlp, normed, rows, hidden, topk_idx, topk_weight, mlp_out)) return -1;
    for (long i = 0; i < rows * hidden; ++i) out[i] = h[i] + mlp_out[i];
    return 0;
}

/* out [rows, H] = the layer on x [rows, H], one new token per sequence at cache position pos: cos/sin
 * [rows, head_dim] its rotary table, mask [rows, max_len] additive. The new key and value are written into
 * the cache; a MoE's choices go to topk_idx and topk_weight [rows, K]. Returns 0, or -1 when scratch memory
 * ran out. */
static int mha_layer_decode(const mha_layer *layer, const float *x, long rows, const float *cos, const float *sin,
                            const float *mask, long pos, long *topk_idx, float *topk_weight, float *out) {
    const long hidden = layer->hidden, q_width = layer->heads * layer->head_dim;
    const long kv_width = layer->kv_heads * layer->head_dim;
    float *buf = grow(&layer_buf, &layer_cap, (size_t)(rows * (3 * hidden + 2 * q_width + 2 * kv_width)));
    if (!buf) return -1;
    float *normed = buf, *h = normed + rows * hidden, *mlp_out = h + rows * hidden;
    float *q = mlp_out + rows * hidden, *k = q + rows * q_width, *v = k + rows * kv_width, *attn = v + rows * kv_width;
    rms_norm_rows(x, layer->input_norm, normed, rows, hidden, layer->eps);
    few_rows_linear(normed, layer->proj[Q], layer->proj_bf16[Q], q, rows, hidden, q_width);
    few_rows_linear(normed, layer->proj[K], layer->proj_bf16[K], k, rows, hidden, kv_width);
    few_rows_linear(normed, layer->proj[V], layer->proj_bf16[V], v, rows, hidden, kv_width);
    if (mha_decode(q, k, v, cos, sin, layer->cache_k, layer->cache_v, mask, attn, rows, layer->heads,
                   layer->kv_heads, layer->head_dim, layer->max_len, pos, layer->scale))
        return -1;
    few_rows_linear(attn, layer->proj[O], layer->proj_bf16[O], h, rows, q_width, hidden);
    return mlp_residuals(layer->mlp, x, h, normed, mlp_out, rows, hidden, layer->post_norm, layer->eps, topk_idx,
                         topk_weight, out);
}

/* ---- mla_decode_attention: absorbed MLA over the compressed cache, one new token per sequence ----
 *
 * For each sequence b and head h: q_latent = W_UK[h] q_nope (the key up-projection folded into the query),
 * score[s] = scale * (q_pe . k_pe[s] + q_latent . compressed_kv[s]) + mask[s] over the written positions,
 * p = softmax(score), out[h] = W_UV[h] (sum_s p[s] compressed_kv[s]). In Paddle this is a dozen ops
 * whose two matmuls over the cache ([16, 512] x [512, S] and back) took 0.25 ms each at S = 2064 on the
 * small model's shapes, and the 4-layer step grew by 7-17% from a 256- to a 2048-token context.
 *
 * Inside a decode step the cache arrives cold (the layer's weights streamed through the caches since the
 * last step), so the kernel reads it from memory once: each thread walks its share of the positions in
 * blocks that fit L2, scores a block for all heads (prefetching the rows ahead), and folds it into its own
 * running softmax (max, sum and p @ compressed_kv per head, rescaled when the max rises) while the block
 * is still in L2; the threads' partial sums are merged at the end. A two-pass version (all scores, then
 * p @ compressed_kv) read the cache twice and took 1.3 ms a layer at S = 2048 with cold caches against
 * 0.4 ms warm. */
static _Thread_local float *mla_buf;
static _Thread_local size_t mla_cap;

/* Positions per block: 64 rows of a 512-wide latent (the small and full models') are 128 KB, which stay in
 * L2 while the heads' scores and then their (heads, columns) output tiles pass over them. */
#define LATENT_BLOCK 64
/* Rows ahead of the scoring loop that are prefetched: the next block, about 150 KB, in flight. */
#define LATENT_PREFETCH_ROWS 64

/* CALL for the heads 0 .. heads - 1 in groups, the heads `head` .. `head` + count - 1: eight at a time
 * (the kernels below keep eight heads' sums in registers), then one at a time; count is a constant in each
 * loop, so the always-inline kernels are specialised for it. */
#define IN_HEAD_GROUPS(heads, head, count, CALL)                                          \
    do {                                                                                  \
        long head = 0;                                                                    \
        for (; head + 8 <= (heads); head += 8) {                                          \
            const int count = 8;                                                          \
            CALL;                                                                         \
        }                                                                                 \
        for (; head < (heads); ++head) {                                                  \
            const int count = 1;                                                          \
            CALL;                                                                         \
        }                                                                                 \
    } while (0)

/* acc[h][t] += q[h0 + h] . rows[s + t] (vectors of `width` floats, rows one after another) for the count
 * heads from h0 and the `tokens` rows from s (count and tokens compile-time constants after inlining): a
 * row is loaded once for all heads and each query vector once for both rows. */
static inline __attribute__((always_inline)) void add_row_dots(__m512 acc[8][2], const float *q, const float *rows,
                                                               long width, long h0, const int count, const int tokens,
                                                               long s) {
    for (long c = 0; c < width; c += 16) {
        const __mmask16 m = tail_mask(width - c);
        __m512 x[2];
        for (int t = 0; t < tokens; ++t) x[t] = _mm512_maskz_loadu_ps(m, rows + (s + t) * width + c);
        for (int h = 0; h < count; ++h) {
            const __m512 query = _mm512_maskz_loadu_ps(m, q + (h0 + h) * width + c);
            for (int t = 0; t < tokens; ++t) acc[h][t] = _mm512_fmadd_ps(query, x[t], acc[h][t]);
        }
    }
}

/* scores[(h0 + h) * LATENT_BLOCK + s - s0] = scale * (q_latent[h] . ckv[s] + q_pe[h] . k_pe[s]) for the
 * count heads from h0 and the `tokens` positions from s, one register accumulator per (head, position). */
static inline __attribute__((always_inline)) void latent_scores(
        const float *q_latent, const float *q_pe, const float *ckv, const float *k_pe, float *scores, long h0,
        const int count, const int tokens, long latent, long rope, long s, long s0, float scale) {
    __m512 acc[8][2];
    for (int h = 0; h < count; ++h)
        for (int t = 0; t < tokens; ++t) acc[h][t] = _mm512_setzero_ps();
    add_row_dots(acc, q_latent, ckv, latent, h0, count, tokens, s);
    add_row_dots(acc, q_pe, k_pe, rope, h0, count, tokens, s);
    for (int h = 0; h < count; ++h)
        for (int t = 0; t < tokens; ++t)
            scores[(h0 + h) * LATENT_BLOCK + s + t - s0] = _mm512_reduce_add_ps(acc[h][t]) * scale;
}

/* The count heads from h0 over positions s0 .. s1 - 1, two at a time. */
static inline __attribute__((always_inline)) void latent_scores_span(
        const float *q_latent, const float *q_pe, const float *ckv, const float *k_pe, float *scores, long h0,
        const int count, long latent, long rope, long s0, long s1, float scale) {
    long s = s0;
    for (; s + 2 <= s1; s += 2)
        latent_scores(q_latent, q_pe, ckv, k_pe, scores, h0, count, 2, latent, rope, s, s0, scale);
    if (s < s1) latent_scores(q_latent, q_pe, ckv, k_pe, scores, h0, count, 1, latent, rope, s, s0, scale);
}

/* partial[h, c .. c + 31] += sum over the n block positions s of p[h, s] ckv[s, c .. c + 31] for the count
 * heads from h0 (count a compile-time constant after inlining), the sums held in registers. */
static inline __attribute__((always_inline)) void latent_outputs(const float *p, const float *ckv, float *partial,
                                                                 long h0, const int count, long latent, long n,
                                                                 long c) {
    const __mmask16 m0 = tail_mask(latent - c), m1 = latent - c > 16 ? tail_mask(latent - c - 16) : 0;
    __m512 acc[8][2];
    for (int h = 0; h < count; ++h) {
        acc[h][0] = _mm512_maskz_loadu_ps(m0, partial + (h0 + h) * latent + c);
        acc[h][1] = _mm512_maskz_loadu_ps(m1, partial + (h0 + h) * latent + c + 16);
    }
    for (long s = 0; s < n; ++s) {
        const __m512 x0 = _mm512_maskz_loadu_ps(m0, ckv + s * latent + c);
        const __m512 x1 = _mm512_maskz_loadu_ps(m1, ckv + s * latent + c + 16);
        for (int h = 0; h < count; ++h) {
            const __m512 w = _mm512_set1_ps(p[(h0 + h) * LATENT_BLOCK + s]);
            acc[h][0] = _mm512_fmadd_ps(w, x0, acc[h][0]);
            acc[h][1] = _mm512_fmadd_ps(w, x1, acc[h][1]);
        }
    }
    for (int h = 0; h < count; ++h) {
        _mm512_mask_storeu_ps(partial + (h0 + h) * latent + c, m0, acc[h][0]);
        _mm512_mask_storeu_ps(partial + (h0 + h) * latent + c + 16, m1, acc[h][1]);
    }
}

/* One head's block of n scores joins its running softmax: adds the mask, raises the running max (*top,
 * rescaling the running sum and the latent sums partial[0 .. latent - 1] when it rises), and turns the
 * scores into exp(score - max), adding them to *sum. A block hidden by -inf everywhere leaves the running
 * softmax as it was and its weights 0. */
static void running_softmax_block(float *scores, const float *mask, long n, float *top, float *sum, float *partial,
                                  long latent) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (long i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, scores + i), _mm512_maskz_loadu_ps(m, mask + i));
        _mm512_mask_storeu_ps(scores + i, m, v);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
    }
    const float block_max = _mm512_reduce_max_ps(vmax);
    if (block_max == -INFINITY) {
        for (long i = 0; i < n; ++i) scores[i] = 0.0f;
        return;
    }
    if (block_max > *top) {
        if (*sum > 0.0f) {
            const float factor = expf(*top - block_max);
            *sum *= factor;
            for (long c = 0; c < latent; ++c) partial[c] *= factor;
        }
        *top = block_max;
    }
    *sum += exp_shifted_sum(scores, scores, n, *top);
}

/* acc[0 .. n - 1] += a * w[offset .. offset + n - 1], w float32 or (bf16) bfloat16. */
static inline void add_scaled_weights(float *acc, float a, const void *w, int bf16, long offset, long n) {
    if (bf16) {
        const bf16_t *row = (const bf16_t *)w + offset;
#pragma omp simd
        for (long i = 0; i < n; ++i) acc[i] += a * bf16_to_float(row[i]);
    } else {
        const float *row = (const float *)w + offset;
#pragma omp simd
        for (long i = 0; i < n; ++i) acc[i] += a * row[i];
    }
}

/* A thread's part of mla_decode_attention's scratch (mla_thread_floats floats each, one after another):
 * its latent sums [heads, latent], running max and sum [heads] and a block of scores [heads, LATENT_BLOCK]. */
typedef struct {
    float *partial, *top, *total, *block;
} mla_thread_state;

static inline long mla_thread_floats(long heads, long latent) {
    return heads * latent + 2 * heads + heads * LATENT_BLOCK;
}

static inline mla_thread_state mla_state_of(float *state, long thread, long heads, long latent) {
    float *partial = state + thread * mla_thread_floats(heads, latent), *top = partial + heads * latent;
    float *total = top + heads;
    return (mla_thread_state){partial, top, total, total + heads};
}

/* q_nope [B, heads, nope], q_pe [B, heads, rope] (rotated), k_pe [B, max_len, rope], ckv [B, max_len, latent]
 * (float32, contiguous); kv_b, kv_b_proj's weight as stored, [heads * (nope + value), latent] float32 or
 * (bf16) bfloat16: head h's W_UK is rows h (nope + value) .. + nope - 1, its W_UV the next value rows, both
 * read along the latent; mask additive [B, max_len] (finite, as the model builds it: finfo.min hides a
 * position); positions 0 .. keys - 1 (1 <= keys <= max_len) are read; a row whose mask hides them all
 * averages them evenly (Paddle's softmax averages the whole buffer there: only padding queries, whose
 * outputs nothing reads); positions masked with -inf are skipped, and a row hidden by -inf everywhere
 * gives zeros. out [B, heads, value]. Returns 0, or -1 when scratch memory ran out.
 *
 * W_UK is read once a call whatever B (each row absorbs every sequence's query while it is in L1), W_UV
 * once per four sequences (few_rows_serial expands four sequences' latent sums a pass), the cache of each
 * sequence once. */
int mla_decode_attention(const float *q_nope, const float *q_pe, const float *k_pe, const float *ckv,
                         const void *kv_b, int bf16, const float *mask, float *out, long batch,
                         long heads, long nope, long rope, long latent, long value, long max_len, long keys,
                         float scale) {
    const long max_threads = omp_get_max_threads(), rows = batch * heads;
    /* q_latent [B, heads, latent], merged [heads, B, latent] (a head's rows together, as few_rows_serial
     * takes them), each thread's expanded rows [4, value], then each thread's mla_thread_state. */
    const long per_thread = 4 * value + mla_thread_floats(heads, latent);
    float *buf = grow(&mla_buf, &mla_cap, (size_t)(2 * rows * latent + max_threads * per_thread));
    if (!buf) return -1;
    float *q_latent = buf, *merged = buf + rows * latent, *expanded = merged + rows * latent;
    float *state = expanded + max_threads * 4 * value;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (long h = 0; h < heads; ++h) {
            for (long b = 0; b < batch; ++b)
                for (long c = 0; c < latent; ++c) q_latent[(b * heads + h) * latent + c] = 0.0f;
            for (long d = 0; d < nope; ++d)
                for (long b = 0; b < batch; ++b)
                    add_scaled_weights(q_latent + (b * heads + h) * latent, q_nope[(b * heads + h) * nope + d], kv_b,
                                       bf16, (h * (nope + value) + d) * latent, latent);
        }
        const long thread = omp_get_thread_num(), threads = omp_get_num_threads();
        const long s0 = keys * thread / threads, s1 = keys * (thread + 1) / threads;
        const mla_thread_state own = mla_state_of(state, thread, heads, latent);
        for (long b = 0; b < batch; ++b) {
            const float *k_pe_b = k_pe + b * max_len * rope, *ckv_b = ckv + b * max_len * latent;
            const float *q_pe_b = q_pe + b * heads * rope, *mask_b = mask + b * max_len;
            const float *q_latent_b = q_latent + b * heads * latent;
            for (long i = 0; i < heads * latent; ++i) own.partial[i] = 0.0f;
            for (long h = 0; h < heads; ++h) own.top[h] = -INFINITY, own.total[h] = 0.0f;
            for (long sb = s0; sb < s1; sb += LATENT_BLOCK) {
                const long se = s1 - sb < LATENT_BLOCK ? s1 : sb + LATENT_BLOCK, ahead = se + LATENT_PREFETCH_ROWS;
                for (long s = se; s < (ahead < s1 ? ahead : s1); ++s) {
                    for (long c = 0; c < latent; c += 16) __builtin_prefetch(ckv_b + s * latent + c, 0, 3);
                    for (long r = 0; r < rope; r += 16) __builtin_prefetch(k_pe_b + s * rope + r, 0, 3);
                }
                IN_HEAD_GROUPS(heads, h0, count, latent_scores_span(q_latent_b, q_pe_b, ckv_b, k_pe_b, own.block, h0,
                                                                    count, latent, rope, sb, se, scale));
                for (long h = 0; h < heads; ++h)
                    running_softmax_block(own.block + h * LATENT_BLOCK, mask_b + sb, se - sb, own.top + h,
                                          own.total + h, own.partial + h * latent, latent);
                for (long c = 0; c < latent; c += 32)
                    IN_HEAD_GROUPS(heads, h0, count, latent_outputs(own.block, ckv_b + sb * latent, own.partial, h0,
                                                                    count, latent, se - sb, c));
            }
#pragma omp barrier
            /* Merge the threads' running softmaxes head by head; the loop's closing barrier frees the threads'
             * states for the next sequence. */
#pragma omp for schedule(static)
            for (long h = 0; h < heads; ++h) {
                float best = -INFINITY, sum = 0.0f, *row = merged + (h * batch + b) * latent;
                for (long t = 0; t < threads; ++t) best = fmaxf(best, mla_state_of(state, t, heads, latent).top[h]);
                for (long c = 0; c < latent; ++c) row[c] = 0.0f;
                for (long t = 0; t < threads; ++t) {
                    const mla_thread_state part = mla_state_of(state, t, heads, latent);
                    const float weight = part.top[h] == -INFINITY ? 0.0f : expf(part.top[h] - best);
                    sum += weight * part.total[h];
                    for (long c = 0; c < latent; ++c) row[c] += weight * part.partial[h * latent + c];
                }
                const float norm = sum > 0.0f ? 1.0f / sum : 0.0f; /* 0: hidden by -inf everywhere */
                for (long c = 0; c < latent; ++c) row[c] *= norm;
            }
        }
        /* out[b, h] = W_UV[h] merged[h, b], four sequences per pass over the weight rows. */
        float *own_expanded = expanded + thread * 4 * value;
        const size_t element = bf16 ? sizeof(bf16_t) : sizeof(float);
#pragma omp for schedule(static)
        for (long h = 0; h < heads; ++h)
            for (long b0 = 0; b0 < batch; b0 += 4) {
                const long count = batch - b0 < 4 ? batch - b0 : 4;
                few_rows_serial(merged + (h * batch + b0) * latent,
                                (const char *)kv_b + (size_t)(h * (nope + value) + nope) * latent * element, bf16,
                                own_expanded, count, latent, value);
                for (long b = 0; b < count; ++b)
                    memcpy(out + ((b0 + b) * heads + h) * value, own_expanded + b * value, value * sizeof(float));
            }
    }
    return 0;
}

enum { Q_A, Q_B, KV_A, KV_B, MLA_O };

/* One MLA decoder layer as native_decode.MLALayer lays it out (the small and full models'): the projections'
 * weights [out, in] (float32, or bfloat16 where proj_bf16; no biases): q_a_proj and q_b_proj, or (q_lora_rank
 * 0, proj[Q_A] NULL) q_proj as proj[Q_B]; kv_a_proj_with_mqa, kv_b_proj, o_proj; the RMSNorms (q_a_norm
 * NULL without q_lora_rank), the layer's cache k_pe [B, max_len, rope] and compressed_kv [B, max_len,
 * latent], and its MLP block. */
typedef struct {
    long hidden, heads, q_lora_rank, latent, nope, rope, value, max_len;
    float eps, scale;
    const float *input_norm, *post_norm, *q_a_norm, *kv_a_norm;
    const void *proj[5];
    int proj_bf16[5];
    float *cache_k_pe, *cache_ckv;
    const mlp_block *mlp;
} mla_layer;

/* dst = rope(x) for the MLA layout: x [d] interleaved pairs, de-interleaved first ([x0, x2, ..., x1, x3,
 * ...], the order the official cache holds) and then rotated as rope_neox. */
static void rope_interleaved(const float *x, const float *cos, const float *sin, float *dst, long d) {
    float split[MAX_HEAD_DIM];
    for (long i = 0; i < d / 2; ++i) split[i] = x[2 * i], split[d / 2 + i] = x[2 * i + 1];
    rope_neox(split, cos, sin, 1.0f, dst, d);
}

/* The MLA layer on x [rows, H] as mha_layer_decode (same arguments; cos/sin [rows, rope]): RMSNorm, the
 * query (through q_a_proj, its RMSNorm and q_b_proj, or q_proj), kv_a_proj_with_mqa split into the latent
 * (RMSNorm'd) and the rope key (rotated), both written into the cache at pos, the query's rope part rotated,
 * mla_decode_attention over positions 0 .. pos, o_proj, then the MLP half. */
static int mla_layer_decode(const mla_layer *layer, const float *x, long rows, const float *cos, const float *sin,
                            const float *mask, long pos, long *topk_idx, float *topk_weight, float *out) {
    const long hidden = layer->hidden, heads = layer->heads, nope = layer->nope, rope = layer->rope;
    const long latent = layer->latent, q_head = nope + rope, q_low = layer->q_lora_rank, kv_width = latent + rope;
    float *buf = grow(&layer_buf, &layer_cap, (size_t)(rows * (3 * hidden + q_low + heads * (2 * q_head + layer->value)
                                                              + kv_width)));
    if (!buf) return -1;
    float *normed = buf, *h = normed + rows * hidden, *mlp_out = h + rows * hidden, *q_a = mlp_out + rows * hidden;
    float *q = q_a + rows * q_low, *kv = q + rows * heads * q_head, *q_nope = kv + rows * kv_width;
    float *q_pe = q_nope + rows * heads * nope, *attn = q_pe + rows * heads * rope;
    rms_norm_rows(x, layer->input_norm, normed, rows, hidden, layer->eps);
    if (layer->proj[Q_A]) {
        few_rows_linear(normed, layer->proj[Q_A], layer->proj_bf16[Q_A], q_a, rows, hidden, q_low);
        rms_norm_rows(q_a, layer->q_a_norm, q_a, rows, q_low, layer->eps);
        few_rows_linear(q_a, layer->proj[Q_B], layer->proj_bf16[Q_B], q, rows, q_low, heads * q_head);
    } else {
        few_rows_linear(normed, layer->proj[Q_B], layer->proj_bf16[Q_B], q, rows, hidden, heads * q_head);
    }
    few_rows_linear(normed, layer->proj[KV_A], layer->proj_bf16[KV_A], kv, rows, hidden, kv_width);
    for (long b = 0; b < rows; ++b) {
        const float *cos_b = cos + b * rope, *sin_b = sin + b * rope, *kv_row = kv + b * kv_width;
        const long slot = b * layer->max_len + pos;
        rms_norm_rows(kv_row, layer->kv_a_norm, layer->cache_ckv + slot * latent, 1, latent, layer->eps);
        rope_interleaved(kv_row + latent, cos_b, sin_b, layer->cache_k_pe + slot * rope, rope);
        for (long head = 0; head < heads; ++head) {
            const float *q_bh = q + (b * heads + head) * q_head;
            memcpy(q_nope + (b * heads + head) * nope, q_bh, (size_t)nope * sizeof(float));
            rope_interleaved(q_bh + nope, cos_b, sin_b, q_pe + (b * heads + head) * rope, rope);
        }
    }
    if (mla_decode_attention(q_nope, q_pe, layer->cache_k_pe, layer->cache_ckv, layer->proj[KV_B],
                             layer->proj_bf16[KV_B], mask, attn, rows, heads, nope, rope, latent, layer->value,
                             layer->max_len, pos + 1, layer->scale))
        return -1;
    few_rows_linear(attn, layer->proj[MLA_O], layer->proj_bf16[MLA_O], h, rows, heads * layer->value, hidden);
    return mlp_residuals(layer->mlp, x, h, normed, mlp_out, rows, hidden, layer->post_norm, layer->eps, topk_idx,
                         topk_weight, out);
}

/* A decoder layer of the stack decode_step runs: an mha_layer (mla 0) or an mla_layer, and the number of
 * experts its MLP block chooses per row (0: dense). */
typedef struct {
    const void *layer;
    int mla;
    long top_k;
} stack_layer;

/* A model's decode step as native_decode.DecodeStack lays it out: its decoder layers; the token embedding
 * table [vocab, hidden] (float32, or bfloat16 where embed_bf16); the rotary inverse frequencies [rotary_dim / 2]
 * with the position divisor (rope_scaling "linear": its factor, else 1) and mscale (yarn's, else 1); the
 * final RMSNorm; the cache's key_valid [rows, max_len] (bytes, 0 at padding and unwritten positions). */
typedef struct {
    const stack_layer *layers;
    long n_layers, hidden, vocab, rotary_dim, max_len;
    const void *embed;
    int embed_bf16;
    const float *inv_freq;
    float position_divisor, mscale;
    const float *final_norm;
    float eps;
    unsigned char *key_valid;
} decode_stack;

static _Thread_local float *step_buf;
static _Thread_local size_t step_cap;

/* out [rows, hidden] = one decode step of the model up to the final RMSNorm, for token ids [rows] at rotary
 * positions [rows], written at cache position pos (key_valid's column pos set): the embedding rows, the
 * rotary table (cos/sin as DeepseekV2RotaryEmbedding computes them in float32), the attention mask
 * (build_attention_mask's: 0 where s <= pos is valid, float32's lowest finite value elsewhere), the layers
 * one after another, the final norm. Layer l's choice of experts goes to topk_idx / topk_weight at offset
 * rows * (the top_k of the layers before it). Why one call: between a step's kernels the weights stream
 * through every cache, so Python and Paddle run cold there: each Paddle op took 0.2-1.3 ms (the embedding,
 * the rotary table, the mask, the final norm's call, the cache bookkeeping about 1 ms each), and the
 * Python around each layer's call 0.2-0.3 ms, a tenth or more of a tiny or small decode step in all.
 * Returns 0; -2 for a token id outside the vocabulary (nothing is written then); or -1 when scratch memory
 * ran out, after key_valid's column pos and some layers' cache slots at pos were written (the caller has
 * not committed pos, so the next step writes them again). */
int decode_step(const decode_stack *stack, const long *ids, const long *positions, long rows, long pos,
                long *topk_idx, float *topk_weight, float *out) {
    const long hidden = stack->hidden, dim = stack->rotary_dim, max_len = stack->max_len;
    for (long b = 0; b < rows; ++b)
        if (ids[b] < 0 || ids[b] >= stack->vocab) return -2;
    float *buf = grow(&step_buf, &step_cap, (size_t)(rows * (hidden + 2 * dim + max_len)));
    if (!buf) return -1;
    float *x = buf, *cos = x + rows * hidden, *sin = cos + rows * dim, *mask = sin + rows * dim;
    for (long b = 0; b < rows; ++b) {
        for (long i = 0; i < hidden; ++i)
            x[b * hidden + i] = stack->embed_bf16 ? bf16_to_float(((const bf16_t *)stack->embed)[ids[b] * hidden + i])
                                                  : ((const float *)stack->embed)[ids[b] * hidden + i];
        const float position = (float)positions[b] / stack->position_divisor;
        for (long i = 0; i < dim / 2; ++i) {
            const float angle = position * stack->inv_freq[i];
            float c = cosf(angle), s = sinf(angle);
            if (stack->mscale != 1.0f) c *= stack->mscale, s *= stack->mscale;
            cos[b * dim + i] = cos[b * dim + dim / 2 + i] = c;
            sin[b * dim + i] = sin[b * dim + dim / 2 + i] = s;
        }
        stack->key_valid[b * max_len + pos] = 1;
        for (long s = 0; s <= pos; ++s) mask[b * max_len + s] = stack->key_valid[b * max_len + s] ? 0.0f : -FLT_MAX;
    }
    const float *in = x;
    for (long l = 0; l < stack->n_layers; ++l) {
        const stack_layer *layer = stack->layers + l;
        const int status = layer->mla
            ? mla_layer_decode(layer->layer, in, rows, cos, sin, mask, pos, topk_idx, topk_weight, out)
            : mha_layer_decode(layer->layer, in, rows, cos, sin, mask, pos, topk_idx, topk_weight, out);
        if (status) return -1;
        in = out, topk_idx += rows * layer->top_k, topk_weight += rows * layer->top_k;
    }
    rms_norm_rows(out, stack->final_norm, out, rows, hidden, stack->eps);
    return 0;
}
#endif
