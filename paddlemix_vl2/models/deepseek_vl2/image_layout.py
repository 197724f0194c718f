"""The 2-D tile layout that turns per-tile projector outputs into the image-token sequence.

Every image is one global view plus ``tw * th`` local tiles (``images_spatial_crop`` holds
``(tw, th)`` = (tiles across, tiles down); locals are listed row-major). With s = tokens per tile
side (14) and D = embedding width, one image becomes

  global: s rows of (s tokens + ``image_newline``)                     -> s * (s + 1) tokens
  locals: the tiles stitched into one (th*s) x (tw*s) grid, each row
          followed by ``image_newline``                                 -> (th*s) * (tw*s + 1) tokens

joined as ``[global, view_seperator, local]`` (``global_view_pos="head"``) or
``[local, view_seperator, global]`` (``"tail"``). The resulting count is the processor's
``num_image_tokens`` (``paddlemix_vl2.processors.image_processing``), the one place of that formula.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import paddle

__all__ = [
    "crops_per_sample",
    "tiles_per_sample",
    "format_image_embeddings",
]

Crop = Tuple[int, int]


def crops_per_sample(images_spatial_crop) -> List[List[Crop]]:
    """The ``(tw, th)`` of each sample's images, in order.

    A crop with a zero entry marks padding and ends that sample's list, as in the official code.

    Args:
        images_spatial_crop: [B, max_images, 2] integers (paddle Tensor or array-like).
    """
    crops = np.asarray(
        images_spatial_crop.numpy() if isinstance(images_spatial_crop, paddle.Tensor) else images_spatial_crop
    )
    if crops.ndim != 3 or crops.shape[-1] != 2:
        raise ValueError(
            f"images_spatial_crop must have shape [batch, max_images, 2], got {list(crops.shape)}"
        )
    if (crops < 0).any():
        raise ValueError("images_spatial_crop has negative tile counts; pass the processor's output unchanged")
    result = []
    for sample in crops:
        valid = []
        for tiles_w, tiles_h in sample.tolist():
            if tiles_w == 0 or tiles_h == 0:
                break
            valid.append((tiles_w, tiles_h))
        result.append(valid)
    return result


def tiles_per_sample(crops: Sequence[Sequence[Crop]]) -> List[int]:
    """Tiles each sample uses: one global view plus ``tw * th`` locals per image."""
    return [sum(1 + tiles_w * tiles_h for tiles_w, tiles_h in sample) for sample in crops]


def _with_newline_column(grid: paddle.Tensor, image_newline: paddle.Tensor) -> paddle.Tensor:
    """[rows, cols, D] -> [rows * (cols + 1), D]: append ``image_newline`` after every row."""
    rows, _, dim = grid.shape
    column = image_newline.reshape([1, 1, dim]).expand([rows, 1, dim])  # [rows, 1, D]
    return paddle.concat([grid, column], axis=1).reshape([-1, dim])  # [rows * (cols + 1), D]


def _format_one_image(
    tiles: paddle.Tensor,
    crop: Crop,
    image_newline: paddle.Tensor,
    view_seperator: paddle.Tensor,
    global_view_pos: str,
) -> paddle.Tensor:
    """[1 + th*tw, s*s, D] (global first, then row-major locals) -> [num_image_tokens, D]."""
    tiles_w, tiles_h = crop
    _, per_tile, dim = tiles.shape
    side = math.isqrt(per_tile)
    global_grid = tiles[0].reshape([side, side, dim])  # [s, s, D]
    global_rows = _with_newline_column(global_grid, image_newline)  # [s * (s + 1), D]
    local = tiles[1:].reshape([tiles_h, tiles_w, side, side, dim])  # [th, tw, s, s, D]
    local = local.transpose([0, 2, 1, 3, 4])  # [th, s, tw, s, D]
    local = local.reshape([tiles_h * side, tiles_w * side, dim])  # [th*s, tw*s, D]
    local_rows = _with_newline_column(local, image_newline)  # [th*s * (tw*s + 1), D]
    separator = view_seperator.reshape([1, dim])  # [1, D]
    parts = [global_rows, separator, local_rows] if global_view_pos == "head" else [local_rows, separator, global_rows]
    return paddle.concat(parts, axis=0)  # [s*(s+1) + 1 + th*s*(tw*s+1), D]


def format_image_embeddings(
    tile_embeds: paddle.Tensor,
    images_spatial_crop,
    image_newline: paddle.Tensor,
    view_seperator: paddle.Tensor,
    global_view_pos: str = "head",
) -> paddle.Tensor:
    """Lay out the projector outputs of a whole batch as image tokens, in sequence order.

    Args:
        tile_embeds: [n_tiles, s*s, D] projector outputs of every non-padding tile of the batch, sample
            by sample, each image as [global, locals row-major].
        images_spatial_crop: [B, max_images, 2] ``(tw, th)`` per image; a zero entry ends a sample.
        image_newline: [D] token appended after every row of every view.
        view_seperator: [D] token between the global and the local view.
        global_view_pos: ``"head"`` (global view first) or ``"tail"``.

    Returns:
        [sum of num_image_tokens over all images, D]: sample 0's images in order, then sample 1's, ...
        This is exactly the order of the True entries of ``images_seq_mask`` read row-major.
    """
    if global_view_pos not in ("head", "tail"):
        raise ValueError(f"global_view_pos={global_view_pos!r} is not supported; use 'head' or 'tail'")
    if tile_embeds.ndim != 3 or math.isqrt(tile_embeds.shape[1]) ** 2 != tile_embeds.shape[1]:
        raise ValueError(
            f"tile_embeds must be [n_tiles, side*side, D] projector outputs, got {list(tile_embeds.shape)}"
        )
    samples = crops_per_sample(images_spatial_crop)
    crops = [crop for sample in samples for crop in sample]
    needed = sum(tiles_per_sample(samples))
    if needed != tile_embeds.shape[0]:
        raise ValueError(
            f"images_spatial_crop describes {needed} tiles but {tile_embeds.shape[0]} tile embeddings were "
            "given; pass the projector outputs of exactly the batch's non-padding tiles"
        )
    if not crops:
        return tile_embeds.reshape([0, tile_embeds.shape[-1]])  # [0, D]
    images = []
    start = 0
    for crop in crops:
        count = 1 + crop[0] * crop[1]
        images.append(
            _format_one_image(tile_embeds[start:start + count], crop, image_newline, view_seperator, global_view_pos)
        )  # [num_image_tokens(crop), D]
        start += count
    return paddle.concat(images, axis=0)  # [total image tokens, D]

