"""The matrices one decode step reads, streamed where they are stored by the package's decode kernels alone.

Why: the decode figures divide by a bandwidth probe that reads freshly allocated memory, but a step reads
its weights wherever the load left them. On a virtual machine those can differ by more than 2×: on the
Intel benchmark guest, 84 MB spans of one page-cached tiny shard, all in 2 MiB folios, streamed through
the decode GEMV at 12-16 GB/s in some places and 25-35 GB/s in others, run after run, while the probe read 24
(benchmarks/README.md). Streaming exactly the step's matrices in the step's order and the way the step
streams them, with nothing else (no attention, routing or norms between them), gives the rate the memory
holding them allows, so the step over it says how much the code adds to reading its weights, whatever
the host.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import paddle

import roofline
from paddlemix_vl2.models.deepseek_vl2 import native

Part = Tuple[List[paddle.Tensor], List[Tuple[paddle.Tensor, ...]]]  # (matrices, MLPs' (gate, up, down))


def moe_layer_count(config) -> int:
    """How many decoder layers of ``config`` have a MoE (each records one routing entry per step)."""
    return sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def last_step_routing(config, routing: Sequence[np.ndarray]) -> List[np.ndarray]:
    """The last step's entries of a cache's routing record (``KVCache.routing``: one topk_idx per MoE layer
    and step, in order)."""
    return list(routing[len(routing) - moe_layer_count(config):])


def step_parts(lm, routing: Sequence[np.ndarray]) -> List[Part]:
    """The weights one decode step of ``lm`` (DeepseekV2ForCausalLM) reads, in its order: per decoder layer
    (the matrices it reads one after another: the attention's decode projections, then the router of a MoE
    layer; its MLPs' (gate, up, down): the distinct routed experts in ``routing``, that step's topk_idx
    [B, K] per MoE layer in layer order, and the shared experts, or a dense layer's MLP); last
    ([lm_head], []). The vectors (norms, noaux_tc's score bias: a few KB) are left out."""
    config = lm.config
    if len(routing) != moe_layer_count(config):
        raise ValueError(f"got routing for {len(routing)} MoE layers, the config has {moe_layer_count(config)}")
    choices = iter(routing)
    parts = []
    for i, layer in enumerate(lm.model.layers):
        attention = layer.self_attn
        matrices = [getattr(attention, name).weight for name in attention.decode_projections]
        if config.is_moe_layer(i):
            moe = layer.mlp
            mlps = [moe.experts[int(e)] for e in np.unique(next(choices))]
            mlps += [] if moe.shared_experts is None else [moe.shared_experts]
            matrices.append(moe.gate.weight)
        else:
            mlps = [layer.mlp]
        parts.append((matrices, [(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight) for mlp in mlps]))
    parts.append(([lm.lm_head.weight], []))
    return parts


def step_matrices(parts: Sequence[Part]) -> List[paddle.Tensor]:
    """Every matrix of ``step_parts``, in order."""
    return [w for matrices, mlps in parts for w in (*matrices, *(w for mlp in mlps for w in mlp))]


def matrix_bytes(matrices: Sequence[paddle.Tensor]) -> int:
    return sum(int(np.prod(w.shape)) * w.element_size() for w in matrices)


def stream_gbs(parts: Sequence[Part], repeats: int = 5, warmup: int = 1) -> Optional[roofline.Rate]:
    """GB/s at which the package's decode kernels read ``step_parts`` for one row, as the step reads them:
    each matrix split between the threads by ``few_rows_linear``, each layer's MLPs dealt out whole to the
    threads by one ``swiglu_mlps`` call. None where they do not serve these weights (no CPU kernels built,
    weights off the host). The kernels are called with one activation and output buffer, so a pass is the
    weights' reading and a call per matrix or MLP group (72 for tiny), which the step's one kernel call does
    not pay: on tiny, every matrix in its own call (294) streamed within 3% of this, mapped and in fresh
    memory, so those calls cost little beside the reading. (The MLP groups go through the ``swiglu_mlps``
    wrapper, which checks the table's pins and allocates its output each call.) MLA's ``kv_b_proj`` is read
    once here, as ``model_costs`` counts it, where the absorbed attention reads it once per sequence: a
    batch of MLA sequences reads more than this streams."""
    with paddle.no_grad():  # the kernels serve inference only
        return _stream_gbs(parts, repeats, warmup)


def _stream_gbs(parts: Sequence[Part], repeats: int, warmup: int) -> Optional[roofline.Rate]:
    matrices = step_matrices(parts)
    activation = paddle.ones([1, max(int(w.shape[1]) for w in matrices)])
    out = paddle.empty([1, max(int(w.shape[0]) for w in matrices)])
    if not all(native.few_rows_applies(activation, w, 1) for w in matrices):
        return None
    kernel, x, y = native.kernel_library().few_rows_linear, activation.data_ptr(), out.data_ptr()
    passes = []
    for layer_matrices, mlps in parts:
        passes += [(kernel, (x, w.data_ptr(), int(native.is_bf16(w)), y, 1, int(w.shape[1]), int(w.shape[0])))
                   for w in layer_matrices]
        if mlps:
            mlp_input = paddle.ones([1, int(mlps[0][0].shape[1])])  # one row of the gates' input width
            passes.append((native.swiglu_mlps, (mlp_input, native.MLPTable(mlps), np.arange(len(mlps)),
                                                 [1] * len(mlps), np.zeros(len(mlps), np.int64),
                                                 np.ones(len(mlps), np.float32))))

    def one_pass() -> None:
        for call, args in passes:
            call(*args)

    times = roofline.run_times(one_pass, repeats, warmup)
    return roofline.rate(matrix_bytes(matrices) / 1e9, times)
