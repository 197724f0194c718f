"""The vision-to-language projector of DeepSeek-VL2.

Shapes: N = tiles, P = g * g vision patches (g = 27), C = ``input_dim``, D = ``n_embed``,
r = ``downsample_ratio``, g' = ceil(g / r) (14).

Sub-layer names follow the official ``nn.Sequential`` numbering (``layers.0``, ``layers.2``, ...; the
odd indices are the parameter-free GELUs), so the checkpoint's ``projector.*`` tensors load unrenamed.
"""
from __future__ import annotations

import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .configuration_deepseek import MlpProjectorConfig
from .layers import Linear

__all__ = ["MlpProjector", "DeepseekVLMlpProjector", "downsample_patches"]


def downsample_patches(features: paddle.Tensor, ratio: int) -> paddle.Tensor:
    """Concatenate each r x r block of neighbouring patches into one vector.

    The square patch grid is zero-padded at the bottom and right up to a multiple of ``ratio``; each
    output vector is ordered ``channel * r*r + dy * r + dx`` (channel-major, like an unfold over NCHW),
    and the blocks are listed row-major.

    Args:
        features: [N, g*g, C] vision features.

    Returns:
        [N, g'*g', C*r*r] with g' = ceil(g / r).
    """
    batch, patches, channels = features.shape
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"projector input has {patches} patches per tile, which is not a square grid")
    blocks = -(-side // ratio)  # g'
    pad = blocks * ratio - side
    x = features.reshape([batch, side, side, channels])  # [N, g, g, C]
    if pad:
        x = F.pad(x, [0, pad, 0, pad], value=0.0, data_format="NHWC")  # [N, g'r, g'r, C]
    x = x.reshape([batch, blocks, ratio, blocks, ratio, channels])  # [N, by, dy, bx, dx, C]
    x = x.transpose([0, 1, 3, 5, 2, 4])  # [N, by, bx, C, dy, dx]
    return x.reshape([batch, blocks * blocks, channels * ratio * ratio])  # [N, g'*g', C*r*r]


class MlpProjector(nn.Layer):
    """Maps vision features to language-model embeddings.

    ``projector_type``:
      * ``identity``: ``[N, P, C] -> [N, P, C]`` (requires C == D);
      * ``linear``: one Linear, ``[N, P, C] -> [N, P, D]``;
      * ``mlp_gelu``: Linear(C, D) then (depth - 1) x [GELU, Linear(D, D)], ``[N, P, C] -> [N, P, D]``;
      * ``downsample_mlp_gelu``: r x r patch merge (``downsample_patches``), then Linear(C*r*r, D*m),
        (depth - 2) x [GELU, Linear(D*m, D*m)], GELU, Linear(D*m, D) with m = ``mlp_ratio``;
        ``[N, g*g, C] -> [N, g'*g', D]``.
    All GELUs are exact (erf), unlike the tanh GELU inside the ViT.
    """

    def __init__(self, config: MlpProjectorConfig):
        super().__init__()
        self.config = config
        kind = config.projector_type
        if kind == "identity":
            if config.input_dim != config.n_embed:
                raise ValueError(
                    f"projector_type 'identity' needs input_dim == n_embed, got {config.input_dim} and "
                    f"{config.n_embed}; use 'linear' or fix projector_config"
                )
            self.layers = nn.Identity()
        elif kind == "linear":
            self.layers = Linear(config.input_dim, config.n_embed)
        elif kind == "mlp_gelu":
            modules = [Linear(config.input_dim, config.n_embed)]
            for _ in range(1, config.depth):
                modules += [nn.GELU(), Linear(config.n_embed, config.n_embed)]
            self.layers = nn.Sequential(*modules)
        elif kind == "downsample_mlp_gelu":
            merged = config.input_dim * config.downsample_ratio ** 2
            hidden = config.n_embed * config.mlp_ratio
            modules = [Linear(merged, hidden)]
            for _ in range(1, config.depth - 1):
                modules += [nn.GELU(), Linear(hidden, hidden)]
            modules += [nn.GELU(), Linear(hidden, config.n_embed)]
            self.layers = nn.Sequential(*modules)
        else:
            raise ValueError(
                f"projector_type={kind!r} is not supported; use identity, linear, mlp_gelu or downsample_mlp_gelu"
            )

    @property
    def downsample_ratio(self) -> int:
        """How many patches per side one output token covers (1 unless the type downsamples)."""
        return self.config.downsample_ratio if self.config.projector_type == "downsample_mlp_gelu" else 1

    def forward(self, features: paddle.Tensor) -> paddle.Tensor:
        """Args:
            features: [N, P, input_dim] vision tower output.

        Returns:
            [N, P', n_embed] with P' = ceil(sqrt(P) / r) ** 2 for ``downsample_mlp_gelu``, else P' = P.
        """
        if features.shape[-1] != self.config.input_dim:
            raise ValueError(
                f"projector expects {self.config.input_dim}-wide features, got {features.shape[-1]}; "
                "projector_config.input_dim must equal vision_config.width"
            )
        if self.config.projector_type == "downsample_mlp_gelu":
            features = downsample_patches(features, self.config.downsample_ratio)  # [N, g'*g', C*r*r]
        return self.layers(features)


DeepseekVLMlpProjector = MlpProjector
