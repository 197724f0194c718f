"""The matrices one decode step reads, streamed where they are stored by the package's decode GEMV alone.

Why: the decode figures divide by a bandwidth probe that reads freshly allocated memory, but a step reads
its weights wherever the load left them. On a virtual machine those can differ by more than 2×: on the
Intel benchmark guest, 84 MB spans of one page-cached tiny shard, all in 2 MiB folios, streamed through
this GEMV at 12-19 GB/s in some places and 25-40 GB/s in others, run after run, while the probe read 24
(benchmarks/README.md). Streaming exactly the step's matrices in the step's order, with nothing else
(no attention, routing, norms or Python between them), gives the rate the memory holding them allows, so
the step over it says how much the code adds to reading its weights, whatever the host.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import paddle

import roofline
from paddlemix_vl2.models.deepseek_vl2 import native


def moe_layer_count(config) -> int:
    return sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def step_matrices(lm, routing: Sequence[np.ndarray]) -> List[paddle.Tensor]:
    """The weight matrices of one decode step of ``lm`` (DeepseekV2ForCausalLM) in the order it reads them:
    per decoder layer the attention's decode projections, then the router, the distinct routed experts in
    ``routing`` (that step's topk_idx [B, K] per MoE layer, in layer order) and the shared experts' gate,
    up and down, or a dense layer's MLP; last the lm_head. The vectors (norms, noaux_tc's score bias: a few KB)
    are left out."""
    config = lm.config
    if len(routing) != moe_layer_count(config):
        raise ValueError(f"got routing for {len(routing)} MoE layers, the config has {moe_layer_count(config)}")
    choices = iter(routing)
    matrices = []
    for i, layer in enumerate(lm.model.layers):
        attention = layer.self_attn
        matrices += [getattr(attention, name).weight for name in attention.decode_projections]
        if config.is_moe_layer(i):
            moe = layer.mlp
            mlps = [moe.experts[int(e)] for e in np.unique(next(choices))]
            mlps += [] if moe.shared_experts is None else [moe.shared_experts]
            matrices.append(moe.gate.weight)
        else:
            mlps = [layer.mlp]
        matrices += [linear.weight for mlp in mlps for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    matrices.append(lm.lm_head.weight)
    return matrices


def matrix_bytes(matrices: Sequence[paddle.Tensor]) -> int:
    return sum(int(np.prod(w.shape)) * w.element_size() for w in matrices)


def stream_gbs(matrices: Sequence[paddle.Tensor], repeats: int = 5, warmup: int = 1) -> Optional[roofline.Rate]:
    """GB/s at which ``native.few_rows_linear`` reads ``matrices`` for one row, one pass over all of them a
    run; None where the kernel does not serve them (no CPU kernels built, weights off the host). The
    kernel is called directly, on one activation and output buffer, so a pass is the weights' reading and
    a call per matrix, which the decode step's one kernel call does not pay (ctypes and a thread barrier:
    6.4 µs warm for an empty one on the Intel guest; an empty call added after each of a tiny step's 294
    changed a 79-85 ms pass by -4 to +7 ms, within its run-to-run spread)."""
    widest_in, widest_out = max(int(w.shape[1]) for w in matrices), max(int(w.shape[0]) for w in matrices)
    activation, out = paddle.ones([1, widest_in]), paddle.empty([1, widest_out])
    if not all(native.few_rows_applies(activation, w, 1) for w in matrices):
        return None
    calls = [(w.data_ptr(), int(native.is_bf16(w)), int(w.shape[1]), int(w.shape[0])) for w in matrices]
    kernel, x, y = native.kernel_library().few_rows_linear, activation.data_ptr(), out.data_ptr()

    def one_pass() -> None:
        for weight, bf16, k_dim, n_dim in calls:
            kernel(x, weight, bf16, y, 1, k_dim, n_dim)

    with paddle.no_grad():
        times = roofline.run_times(one_pass, repeats, warmup)
    return roofline.rate(matrix_bytes(matrices) / 1e9, times)
