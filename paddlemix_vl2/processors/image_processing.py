"""Image side of the DeepSeek-VL2 processor: loading, tiling and normalising, and the image-token count.

Every image becomes one global view (the whole image padded to ``image_size``²) followed by a grid of
``num_width_tiles × num_height_tiles`` local tiles cut row-major from the image padded to the best candidate
resolution. Padding uses PIL's own ``ImageOps.pad`` (bicubic resize, centred, colour = ``int(mean·255)``),
because pixel parity with the reference depends on PIL's resampling.
"""
from __future__ import annotations

import math
import os
from typing import List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageLoadError",
    "ImageTransform",
    "downsampled_grid_size",
    "load_image",
    "load_images",
    "num_image_tokens",
    "select_best_resolution",
]

ImageInput = Union[Image.Image, str, os.PathLike]


class ImageLoadError(ValueError):
    """An image that cannot be decoded or has no pixels; the message names the file when there is one."""


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image or a file path (other modes are converted, alpha is dropped)."""
    if isinstance(image, Image.Image):
        name = "the given PIL image"
        try:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
        except OSError as err:
            raise ImageLoadError(f"cannot decode {name} ({err})") from err
    elif isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        if os.path.isdir(name):
            raise ImageLoadError(f"{name!r} is a folder, not an image file; pass the path of the image itself")
        if not os.path.isfile(name):
            raise FileNotFoundError(f"image file {name!r} not found")
        try:
            with Image.open(name) as opened:
                rgb = opened.convert("RGB")
        except Image.DecompressionBombError as err:
            raise ImageLoadError(f"refusing image file {name!r} ({err}); resize it first") from err
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ImageLoadError(
                f"cannot read image file {name!r} ({err}); check that it is a complete image in a format PIL reads"
            ) from err
    else:
        raise TypeError(f"images must be PIL images or file paths, got {type(image).__name__}")
    if rgb.width == 0 or rgb.height == 0:
        raise ImageLoadError(f"{name} has zero size ({rgb.width}x{rgb.height}); every image needs pixels")
    return rgb


def select_best_resolution(
    image_size: Tuple[int, int], candidate_resolutions: Sequence[Sequence[int]]
) -> Tuple[int, int]:
    """The (width, height) candidate that keeps the most of the image's pixels.

    For each candidate the image is scaled to fit inside it; the effective resolution is the scaled pixel
    count (at most the original count) and the waste is the rest of the candidate's area. The best
    candidate has the largest effective resolution, then the smallest waste, then comes first in the list.

    Args:
        image_size: (width, height) of the image, both > 0.
        candidate_resolutions: (width, height) pairs, e.g. the 23 of ``processor_config.json``.
    """
    original_width, original_height = image_size
    best_fit = None
    max_effective, min_wasted = 0, math.inf
    for width, height in candidate_resolutions:
        scale = min(width / original_width, height / original_height)
        scaled_pixels = int(original_width * scale) * int(original_height * scale)
        effective = min(scaled_pixels, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def downsampled_grid_size(image_size: int = 384, patch_size: int = 14, downsample_ratio: int = 2) -> int:
    """Side of the token grid one tile yields: ceil((image_size // patch_size) / downsample_ratio) = 14."""
    return math.ceil((image_size // patch_size) / downsample_ratio)


def num_image_tokens(
    num_width_tiles, num_height_tiles, image_size: int = 384, patch_size: int = 14, downsample_ratio: int = 2
):
    """Number of ``<image>`` tokens for one image tiled ``num_width_tiles × num_height_tiles``.

    Layout (g = ``downsampled_grid_size``): the global view is g rows of g tokens plus a newline token each,
    then one view separator, then the local tiles as ``num_height_tiles·g`` rows of
    ``num_width_tiles·g`` tokens plus a newline each. For 384/14/2 this is ``211 + 14·h·(14·w + 1)``.
    Works elementwise on integer numpy arrays / paddle tensors too.
    """
    grid = downsampled_grid_size(image_size, patch_size, downsample_ratio)
    return grid * (grid + 1) + 1 + (num_height_tiles * grid) * (num_width_tiles * grid + 1)


class ImageTransform:
    """PIL image → float32 array [3, H, W]: ``x / 255``, then ``(x − mean) / std`` when ``normalize``."""

    def __init__(
        self,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        normalize: bool = True,
    ):
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normalize = normalize
        # Same float32 operation order as torchvision's ToTensor + Normalize, so the values match bit for bit.
        self._mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)

    @property
    def pad_color(self) -> Tuple[int, int, int]:
        """Colour of the letterbox padding: the mean colour, (127, 127, 127) for mean 0.5."""
        return tuple(int(channel * 255) for channel in self.mean)

    def __call__(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        if self.normalize:
            pixels = (pixels - self._mean) / self._std
        return pixels

    def tiles(self, image: Image.Image, tile_grid: Tuple[int, int], image_size: int) -> np.ndarray:
        """The global view and the local tiles of one RGB image.

        Args:
            image: RGB PIL image.
            tile_grid: (num_width_tiles, num_height_tiles) of the local view.
            image_size: side of every tile (384).
        Returns:
            float32 [1 + w·h, 3, image_size, image_size]: global view, then local tiles row-major.
        """
        num_width_tiles, num_height_tiles = tile_grid
        global_view = self(ImageOps.pad(image, (image_size, image_size), color=self.pad_color))
        canvas_size = (num_width_tiles * image_size, num_height_tiles * image_size)
        local_view = self(ImageOps.pad(image, canvas_size, color=self.pad_color))
        # [3, h·S, w·S] -> [3, h, S, w, S] -> [h, w, 3, S, S] -> [h·w, 3, S, S] (row-major tiles)
        local_tiles = local_view.reshape(3, num_height_tiles, image_size, num_width_tiles, image_size)
        local_tiles = local_tiles.transpose(1, 3, 0, 2, 4).reshape(-1, 3, image_size, image_size)
        return np.concatenate([global_view[None], local_tiles], axis=0)


def load_images(images: Sequence[ImageInput]) -> List[Image.Image]:
    """``load_image`` for each entry."""
    return [load_image(image) for image in images]
