"""Mixture of experts: the router ``MoEGate`` and ``DeepseekV2MoE`` (routed + shared experts).

Shapes: N tokens (batch * sequence), H hidden size, E routed experts, K experts per token,
G expert groups. The router always runs in float32 and routed outputs are combined in float32.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from paddle.autograd import PyLayer

from .configuration_deepseek import DeepseekV2Config
from .layers import DeepseekV2MLP, memoized_native_table
from .native import MLPTable, mlp_kernels_apply, swiglu_mlps
from .native_decode import MLPBlock, RouterConfig, decode_rows_apply, mlp_block_decode

__all__ = ["MoEGate", "DeepseekV2MoE", "AddAuxiliaryLoss", "route", "moe_aux_loss"]


def _keep_top_groups(choice: paddle.Tensor, n_group: int, topk_group: int, group_score: str) -> paddle.Tensor:
    """Zero every expert outside the ``topk_group`` best groups. choice: [N, E] -> [N, E].

    NOTE(port): masked experts get 0.0 as in the official code (vLLM uses -inf); that only matters when
    biased sigmoid scores go negative.
    """
    n = choice.shape[0]
    grouped = choice.reshape([n, n_group, -1])  # [N, G, E/G]
    if group_score == "max":
        scores = grouped.max(axis=-1)
    else:
        scores = paddle.topk(grouped, k=2, axis=-1)[0].sum(axis=-1)  # [N, G]: sum of the best two
    group_idx = paddle.topk(scores, k=topk_group, axis=-1)[1]  # [N, topk_group]
    group_mask = paddle.zeros_like(scores).put_along_axis(group_idx, paddle.ones_like(group_idx, dtype=scores.dtype), axis=1)
    expert_mask = group_mask.unsqueeze(-1).expand(grouped.shape).reshape([n, -1])  # [N, E]
    return paddle.where(expert_mask > 0, choice, paddle.zeros_like(choice))


def route(
    logits: paddle.Tensor,
    config: DeepseekV2Config,
    e_score_correction_bias: Optional[paddle.Tensor] = None,
) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Select K experts per token from float32 router logits [N, E].

    Returns:
        topk_idx [N, K] int64, topk_weight [N, K] float32, scores [N, E] (the routing probabilities).
    """
    k = config.num_experts_per_tok
    if config.scoring_func == "softmax":
        scores = F.softmax(logits, axis=-1)
    else:
        scores = F.sigmoid(logits)
    method = config.moe_topk_method
    if method == "greedy":
        topk_weight, topk_idx = paddle.topk(scores, k=k, axis=-1)
    elif method == "group_limited_greedy":
        masked = _keep_top_groups(scores, config.n_group, config.topk_group, "max")
        topk_weight, topk_idx = paddle.topk(masked, k=k, axis=-1)
    else:  # noaux_tc: the bias only steers the choice; the weights are the unbiased scores.
        choice = scores + e_score_correction_bias.astype(paddle.float32).unsqueeze(0)
        masked = _keep_top_groups(choice, config.n_group, config.topk_group, "top2")
        topk_idx = paddle.topk(masked, k=k, axis=-1)[1]
        topk_weight = paddle.take_along_axis(scores, topk_idx, axis=1)
    if k > 1 and config.norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(axis=-1, keepdim=True) + 1e-20)
    return topk_idx, topk_weight * config.routed_scaling_factor, scores


def moe_aux_loss(
    scores: paddle.Tensor, topk_idx: paddle.Tensor, batch_size: int, n_experts: int, alpha: float, seq_aux: bool
) -> paddle.Tensor:
    """The official load-balancing loss over all tokens of the batch. scores [N, E], topk_idx [N, K]."""
    k = topk_idx.shape[-1]
    if seq_aux:
        seq_len = scores.shape[0] // batch_size
        counts = F.one_hot(topk_idx.reshape([batch_size, -1]), n_experts).sum(axis=1)  # [B, E]
        ce = counts / (seq_len * k / n_experts)
        mean_scores = scores.reshape([batch_size, seq_len, n_experts]).mean(axis=1)  # [B, E]
        return (ce * mean_scores).sum(axis=1).mean() * alpha
    fraction = F.one_hot(topk_idx.reshape([-1]), n_experts).astype(paddle.float32).mean(axis=0)  # [E]
    return (scores.mean(axis=0) * fraction * n_experts).sum() * alpha


class MoEGate(nn.Layer):
    """The router. ``weight`` is [E, H] as in the checkpoint (a bare parameter, not a Linear)."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.config = config
        self.n_routed_experts = config.n_routed_experts
        self.weight = self.create_parameter([config.n_routed_experts, config.hidden_size])
        if config.moe_topk_method == "noaux_tc":
            # Moved by a balancing rule outside gradient descent, never by a gradient.
            self.e_score_correction_bias = self.create_parameter(
                [config.n_routed_experts], default_initializer=nn.initializer.Constant(0.0)
            )
            self.e_score_correction_bias.stop_gradient = True
        else:
            self.e_score_correction_bias = None

    def forward(self, hidden_states: paddle.Tensor):
        """hidden_states [B, T, H] -> (topk_idx [N, K], topk_weight [N, K] float32, aux_loss or None)."""
        bsz = hidden_states.shape[0]
        x = hidden_states.reshape([-1, hidden_states.shape[-1]]).astype(paddle.float32)
        logits = paddle.matmul(x, self.weight.astype(paddle.float32), transpose_y=True)  # [N, E]
        topk_idx, topk_weight, scores = route(logits, self.config, self.e_score_correction_bias)
        aux_loss = None
        # noaux_tc balances experts through e_score_correction_bias, not a loss (the official code
        # refuses to train it); every other method adds the auxiliary loss in training.
        if self.training and self.config.aux_loss_alpha > 0 and self.config.moe_topk_method != "noaux_tc":
            aux_loss = moe_aux_loss(
                scores, topk_idx, bsz, self.n_routed_experts, self.config.aux_loss_alpha, self.config.seq_aux
            )
        return topk_idx, topk_weight, aux_loss


class AddAuxiliaryLoss(PyLayer):
    """Identity on ``x`` whose backward also feeds gradient 1 into ``loss``.

    This puts the load-balancing loss into every parameter's gradient without changing the forward
    output or the reported loss, as the official model does.
    """

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, paddle.ones(ctx.loss_shape, dtype=ctx.loss_dtype)


class DeepseekV2MoE(nn.Layer):
    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        if config.ep_size > 1:
            raise NotImplementedError(
                "ep_size > 1 (expert parallel over paddle.distributed) is not implemented yet; set ep_size to 1"
            )
        self.config = config
        self.num_experts_per_tok = config.num_experts_per_tok
        self.experts = nn.LayerList(
            [DeepseekV2MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)]
        )
        self.gate = MoEGate(config)
        if config.n_shared_experts is not None:
            self.shared_experts = DeepseekV2MLP(
                config.hidden_size, config.moe_intermediate_size * config.n_shared_experts
            )
        else:
            self.shared_experts = None

    def forward(self, hidden_states: paddle.Tensor, cache=None) -> paddle.Tensor:
        """hidden_states [B, T, H] -> [B, T, H]. ``cache``: the generation's ``KVCache``, where the
        kernel's table of expert weights is kept, or None."""
        shape = hidden_states.shape
        x = hidden_states.reshape([-1, shape[-1]])
        if cache is not None and decode_rows_apply(x):
            block = self.decode_block(cache)
            if block is not None:
                y, topk_idx, _ = mlp_block_decode(x, block)
                cache.record_routing(topk_idx)
                return y.reshape(shape)
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        if cache is not None:
            cache.record_routing(topk_idx)
        if mlp_kernels_apply(x, self.experts[0].gate_proj.weight, x.shape[0]):
            y = self._experts_native(x, topk_idx, topk_weight, cache)
            if y is not None:
                return y.reshape(shape)
        y = self.moe_infer(x, topk_idx, topk_weight).reshape(shape)
        if aux_loss is not None:
            y = AddAuxiliaryLoss.apply(y, aux_loss)
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden_states)
        return y

    def moe_infer(self, x: paddle.Tensor, topk_idx: paddle.Tensor, topk_weight: paddle.Tensor) -> paddle.Tensor:
        """Run each token through its K experts, grouped by expert. x [N, H] -> [N, H].

        The N*K (token, expert) pairs are sorted by expert once; each active expert then runs one
        matmul chain on its contiguous block, and the inverse permutation brings the outputs back.
        One host sync per layer reads the per-expert counts. Used for training too (differentiable).
        A single token (one-row decode) takes a shorter path with the same result.
        """
        n, k = topk_idx.shape
        if n == 1:
            return self._one_token(x, topk_idx, topk_weight)
        flat_idx = topk_idx.reshape([-1])  # [N*K]
        order = paddle.argsort(flat_idx, stable=True)  # [N*K] pair ids sorted by expert
        counts = paddle.bincount(flat_idx, minlength=len(self.experts)).tolist()
        active = [expert_id for expert_id, count in enumerate(counts) if count]
        x_sorted = paddle.gather(x, order // k)  # [N*K, H]
        # One split rather than a slice per expert: each slice's gradient is a zero tensor of the whole
        # [N*K, H] block, so slicing cost E full-size buffers in the backward pass.
        blocks = paddle.split(x_sorted, [counts[expert_id] for expert_id in active], axis=0)
        y_sorted = paddle.concat(
            [self.experts[expert_id](block) for expert_id, block in zip(active, blocks)], axis=0
        )  # [N*K, H]
        y = paddle.gather(y_sorted, paddle.argsort(order))  # back to (token, k) order
        return _mix_expert_outputs(topk_weight, y.reshape([n, k, -1])).astype(x.dtype)

    def _one_token(self, x: paddle.Tensor, topk_idx: paddle.Tensor, topk_weight: paddle.Tensor) -> paddle.Tensor:
        """x [1, H]: each chosen expert runs on the token and one matmul mixes their outputs -> [1, H].

        Nothing needs sorting or gathering for one token; at decode the per-op overhead this saves is a
        noticeable share of a step.
        """
        outputs = paddle.concat([self.experts[e](x) for e in topk_idx.numpy()[0].tolist()])  # [K, H]
        return _mix_expert_outputs(topk_weight, outputs.unsqueeze(0)).astype(x.dtype)

    def native_table(self, expert_ids: Optional[Sequence[int]] = None) -> Optional[MLPTable]:
        """The routed experts (all, or those of ``expert_ids`` in that order), then the shared experts (if
        any), as one ``native.MLPTable``; None when a projection is wrapped (LoRA) or the weights differ in
        dtype, which the plain path handles."""
        experts = self.experts if expert_ids is None else [self.experts[int(e)] for e in expert_ids]
        mlps = [expert.native_weights() for expert in experts]
        if self.shared_experts is not None:
            mlps.append(self.shared_experts.native_weights())
        return MLPTable.of(mlps)

    def decode_block(self, cache) -> Optional[MLPBlock]:
        """This layer as the decode kernels take it (router, routed and shared experts), kept in the
        generation's ``KVCache``; None where they do not serve it (see ``native_table``,
        ``MLPBlock.moe``). A call through it (up to ``MAX_FEW_ROWS`` rows with a cache: decode steps, short
        prompts) routes in the kernel: the gate module is not called, so its hooks do not see those calls
        (``KVCache.routing`` records them)."""

        def build():
            table = memoized_native_table(self, cache)
            if table is None:
                return None
            router = RouterConfig.of(self.config, self.gate.e_score_correction_bias)
            return MLPBlock.moe(table, self.gate.weight, router, shared=self.shared_experts is not None)

        return cache.memo((id(self), "decode_block"), build)

    def _experts_native(
        self, x: paddle.Tensor, topk_idx: paddle.Tensor, topk_weight: paddle.Tensor, cache
    ) -> Optional[paddle.Tensor]:
        """x [N, H] -> routed and shared experts together [N, H] by one ``native.swiglu_mlps`` call: each
        chosen expert takes the tokens that chose it, with their router weights. None when the experts
        have no table (``native_table``)."""
        chosen, weights = topk_idx.numpy().reshape([-1]), topk_weight.numpy().reshape([-1])
        order = np.argsort(chosen, kind="stable")  # (token, slot) pairs grouped by expert
        mlp_ids, row_counts = np.unique(chosen, return_counts=True)
        if cache is None:
            # No generation to keep a table for: gather only the experts that run (all of the tiny model's
            # 64 + 1 took about 1.7 ms a layer, the chosen ones about 0.1).
            table, mlp_ids = self.native_table(mlp_ids), np.arange(len(mlp_ids))
        else:
            table = memoized_native_table(self, cache)
        if table is None:
            return None
        row_ids, row_scales = order // self.num_experts_per_tok, weights[order]
        if self.shared_experts is not None:
            n = x.shape[0]
            mlp_ids = np.append(mlp_ids, len(table.intermediate) - 1)
            row_counts = np.append(row_counts, n)
            row_ids = np.concatenate([row_ids, np.arange(n)])
            row_scales = np.concatenate([row_scales, np.ones(n, dtype=np.float32)])
        return swiglu_mlps(x, table, mlp_ids, row_counts, row_ids, row_scales)


def _mix_expert_outputs(topk_weight: paddle.Tensor, outputs: paddle.Tensor) -> paddle.Tensor:
    """Each token's K expert outputs weighted and summed in float32: topk_weight [N, K] float32, outputs
    [N, K, H] -> [N, H] float32.

    One batched [1, K] @ [K, H] matmul per token: Paddle's CPU broadcasting multiply and sum took 33.5 ms
    for N = 1037, K = 6, H = 1280 where the matmul takes 1.8 ms (same sums up to rounding, 1e-6).
    """
    return paddle.matmul(topk_weight.unsqueeze(1), outputs.astype(paddle.float32)).squeeze(1)
