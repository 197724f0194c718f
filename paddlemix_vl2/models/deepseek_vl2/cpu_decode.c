/* A decode step's layer blocks in one call each, for one to eight rows (a token per sequence):
 * mlp_block_decode, a layer's MLP part (a MoE with its router: the logits, the choice of experts by the
 * rules of moe.route in route_rows, the chosen and shared experts through swiglu_mlps; or a dense MLP), and
 * mha_layer_decode, a whole decoder layer with multi-head attention (the tiny model's): RMSNorm, the q/k/v
 * projections, mha_decode, o_proj, the residual, RMSNorm, the MLP block, the residual.
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

/* out [rows, H] = the layer on x [rows, H], one new token per sequence at cache position pos: cos/sin
 * [rows, head_dim] its rotary table, mask [rows, max_len] additive. The new key and value are written into
 * the cache; a MoE's choices go to topk_idx and topk_weight [rows, K]. Returns 0, or -1 when scratch memory
 * ran out. */
int mha_layer_decode(const mha_layer *layer, const float *x, long rows, const float *cos, const float *sin,
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
    for (long i = 0; i < rows * hidden; ++i) h[i] += x[i];
    rms_norm_rows(h, layer->post_norm, normed, rows, hidden, layer->eps);
    if (mlp_block_decode(layer->mlp, normed, rows, hidden, topk_idx, topk_weight, mlp_out)) return -1;
    for (long i = 0; i < rows * hidden; ++i) out[i] = h[i] + mlp_out[i];
    return 0;
}
#endif
