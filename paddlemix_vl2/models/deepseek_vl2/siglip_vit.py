"""The SigLIP vision tower of DeepSeek-VL2 (a timm-style ViT without class token or head).

Shapes: N = tiles, C = ``width``, P = ``grid_size ** 2`` patches (27 * 27 = 729 at 384 px / 14 px),
nh = ``heads``, hd = C // nh.

Sub-layer names equal the official checkpoint names under ``vision.`` (``patch_embed.proj``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so
``load_weights(tower, ckpt_dir, prefix="vision.")`` needs no renaming.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn

from .configuration_deepseek import VisionEncoderConfig
from .layers import ACTIVATION_BLOCK_BYTES, Linear, attend, gelu_tanh
from .native import attention_qkv, vector_kernels_apply

__all__ = ["VisionTransformer", "SigLIPVisionTransformer"]

LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Layer):
    """Non-overlapping patch projection: ``[N, 3, S, S] -> [N, P, C]``.

    A stride-``patch_size`` convolution keeps only whole patches, so when ``S`` is not a multiple of
    ``patch_size`` (384 = 27 * 14 + 6) the last pixel rows and columns are never read, as in the
    official tower.
    """

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2D(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: paddle.Tensor) -> paddle.Tensor:
        x = self.proj(pixels)  # [N, C, g, g]
        return x.flatten(2).transpose([0, 2, 1])  # [N, g*g, C]


class Attention(nn.Layer):
    """Bidirectional multi-head self-attention with a fused qkv projection: ``[N, P, C] -> [N, P, C]``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"vision_config.width={width} is not divisible by vision_config.heads={heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        batch, seq, _ = x.shape
        qkv = self.qkv(x)  # [N, P, 3C]
        if vector_kernels_apply(qkv):
            return self.proj(attention_qkv(qkv, self.heads, self.head_dim ** -0.5))
        # Heads-first q, k, v by block copies (split the channels, stack): Paddle's transposing copy is
        # element by element and several times slower. The attention batch then runs over (head, tile)
        # pairs instead of (tile, head), which attention is indifferent to.
        per_head = paddle.stack(paddle.split(qkv, 3 * self.heads, axis=-1))  # [3*nh, N, P, hd]
        q, k, v = per_head.reshape([3, self.heads, batch, seq, self.head_dim]).unbind(axis=0)  # [nh, N, P, hd]
        out = attend(q, k, v, None, self.head_dim ** -0.5)  # [nh, N, P, hd]
        return self.proj(paddle.concat(out.unbind(axis=0), axis=-1))  # heads side by side: [N, P, C]


class Mlp(nn.Layer):
    """``fc1 -> GELU(tanh) -> fc2``: ``[N, P, C] -> [N, P, C]``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # SigLIP was trained with the tanh approximation of GELU (the projector uses the exact one).
        return self.fc2(gelu_tanh(self.fc1(x), overwrite=True))


class Block(nn.Layer):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, epsilon=LAYER_NORM_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, epsilon=LAYER_NORM_EPS)
        self.mlp = Mlp(width, mlp_hidden)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Layer):
    """SigLIP ViT features: ``[N, 3, S, S] -> [N, P, C]`` after the final LayerNorm.

    The official tower also builds an attention-pooling head (``attn_pool``) that DeepSeek-VL2 never
    calls (``ignore_head=True``); it is not built here and its checkpoint tensors are skipped on load.
    """

    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        if config.class_token:
            raise ValueError("vision_config.class_token=true is not supported; DeepSeek-VL2 towers have none")
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.width)
        self.pos_embed = self.create_parameter(
            [1, config.grid_size ** 2, config.width],
            default_initializer=nn.initializer.Normal(std=0.02),
        )
        self.blocks = nn.LayerList(
            [Block(config.width, config.heads, config.mlp_hidden_dim) for _ in range(config.layers)]
        )
        self.norm = nn.LayerNorm(config.width, epsilon=LAYER_NORM_EPS)

    def forward(self, pixels: paddle.Tensor) -> paddle.Tensor:
        """Args:
            pixels: [N, 3, image_size, image_size] normalised tiles, in the tower's dtype.

        Returns:
            [N, grid_size**2, width] patch features.
        """
        size = self.config.image_size
        if pixels.ndim != 4 or list(pixels.shape[1:]) != [3, size, size]:
            raise ValueError(
                f"vision tower expects tiles of shape [N, 3, {size}, {size}], got {list(pixels.shape)}; "
                "pass the processor's images tensor"
            )
        x = self.patch_embed(pixels) + self.pos_embed  # [N, P, C]
        # A few tiles at a time, so the widest activation (the MLP's hidden layer) stays within
        # ACTIVATION_BLOCK_BYTES; the matmuls keep at least one whole tile (729 rows) each.
        widest = x.shape[1] * max(3 * self.config.width, self.config.mlp_hidden_dim) * x.element_size()
        sizes = _group_sizes(x.shape[0], max(1, ACTIVATION_BLOCK_BYTES // widest))
        if len(sizes) == 1:
            return self._tower(x)
        return paddle.concat([self._tower(tiles) for tiles in paddle.split(x, sizes)])

    def _tower(self, x: paddle.Tensor) -> paddle.Tensor:
        """The blocks and the final norm on [n, P, C]."""
        for block in self.blocks:
            x = block(x)  # [n, P, C]
        return self.norm(x)


def _group_sizes(total: int, group: int):
    """Sizes of consecutive groups of at most ``group`` items covering ``total``."""
    return [min(group, total - start) for start in range(0, total, group)]


SigLIPVisionTransformer = VisionTransformer
