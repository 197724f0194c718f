"""DeepSeek-VL2: SigLIP tower -> projector -> 2-D tile layout -> DeepSeek-V2 language model.

Shapes: B = batch, T = sequence length, H = language hidden size (= projector ``n_embed``),
max_tiles = tiles per sample after padding, S = tile size in pixels (384).

Attribute names equal the checkpoint prefixes (``vision.``, ``projector.``, ``image_newline``,
``view_seperator``, ``language.``), so one ``load_weights(model, ckpt_dir)`` loads the whole model.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from ...processors.image_processing import num_image_tokens
from ...generation import GenerationConfig, generate, stream_generate
from .checkpoint import build_and_load, refuse_training_bf16_storage, save_weights
from .configuration_deepseek import ConfigError, DeepseekVLV2Config
from .image_layout import crops_per_sample, format_image_embeddings, tiles_per_sample
from .kv_cache import KVCache
from .modeling_deepseek import CausalLMOutput, DeepseekV2ForCausalLM
from .projector import MlpProjector
from .siglip_vit import VisionTransformer

__all__ = ["DeepseekVLV2ForCausalLM", "ImageInputError", "CHECKPOINT_ASSETS"]

# Files of an official checkpoint besides config.json and the weights, copied along by save_pretrained.
CHECKPOINT_ASSETS = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Fields of the processor's batch output that the model does not read, so ``model(**inputs)`` works.
_PROCESSOR_ONLY_FIELDS = frozenset({"sft_format", "seq_lens", "num_image_tokens"})


class ImageInputError(ValueError):
    """Image tensors that do not fit the token ids; the message names the sample and the fix."""


class DeepseekVLV2ForCausalLM(nn.Layer):
    """The vision-language model.

    ``prepare_inputs_embeds`` builds the language model's input embeddings with the images merged in;
    text generation then runs on ``self.language``.
    """

    def __init__(self, config: DeepseekVLV2Config):
        super().__init__()
        n_embed = config.projector_config.n_embed
        if n_embed != config.language_config.hidden_size:
            raise ConfigError(
                f"projector_config.n_embed={n_embed} differs from language_config.hidden_size="
                f"{config.language_config.hidden_size}; they must be equal"
            )
        self.config = config
        self.vision = VisionTransformer(config.vision_config)
        self.projector = MlpProjector(config.projector_config)
        embed_init = nn.initializer.Normal(std=n_embed ** -0.5)
        self.image_newline = self.create_parameter([n_embed], default_initializer=embed_init)
        # NOTE(port): "seperator" is the official checkpoint's spelling; renaming it would break loading.
        self.view_seperator = self.create_parameter([n_embed], default_initializer=embed_init)
        self.language = DeepseekV2ForCausalLM(config.language_config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language.model.embed_tokens

    def image_tokens_for(self, num_width_tiles: int, num_height_tiles: int) -> int:
        """Sequence positions one image with this tiling takes under this model's config."""
        vision = self.config.vision_config
        return num_image_tokens(
            num_width_tiles, num_height_tiles, vision.image_size, vision.patch_size, self.projector.downsample_ratio
        )

    def encode_tiles(self, tiles: paddle.Tensor) -> paddle.Tensor:
        """Vision tower then projector: [n_tiles, 3, S, S] -> [n_tiles, s*s, H] (s = 14 by default)."""
        return self.projector(self.vision(tiles.astype(self.vision.pos_embed.dtype)))

    def prepare_inputs_embeds(
        self,
        input_ids: paddle.Tensor,
        images: Optional[paddle.Tensor] = None,
        images_seq_mask: Optional[paddle.Tensor] = None,
        images_spatial_crop: Optional[paddle.Tensor] = None,
    ) -> paddle.Tensor:
        """Text embeddings with the image embeddings written into the image-token positions.

        Args:
            input_ids: [B, T] token ids.
            images: [B, max_tiles, 3, S, S] tiles per sample (each image: global view, then its local tiles
                row-major; zero tiles pad the end), or None.
            images_seq_mask: [B, T] True (or 1) where an image embedding goes.
            images_spatial_crop: [B, max_images, 2] ``(tiles across, tiles down)`` per image; a zero entry
                ends that sample's images.

        Returns:
            [B, T, H] input embeddings. Without images (``images`` is None or every crop is zero) these are
            the text embeddings alone.
        """
        text_embeds = self.get_input_embeddings()(input_ids)  # [B, T, H]
        if images is None or images_spatial_crop is None:
            return text_embeds
        if isinstance(images_spatial_crop, paddle.Tensor):
            images_spatial_crop = images_spatial_crop.numpy()  # the one host copy of the crops
        crop_array = np.asarray(images_spatial_crop)  # [B, max_images, 2]
        crops = crops_per_sample(crop_array)
        if not any(crops):
            return text_embeds
        if images_seq_mask is None:
            raise ImageInputError("images were given without images_seq_mask; pass the processor's images_seq_mask")
        mask = images_seq_mask.astype("bool")  # [B, T]
        self._check_image_inputs(input_ids, images, mask, crops)

        tiles_used = tiles_per_sample(crops)
        max_tiles = images.shape[1]
        tile_index = np.concatenate(
            [b * max_tiles + np.arange(count) for b, count in enumerate(tiles_used)]
        ).astype("int64")  # [n_tiles]
        tiles = paddle.gather(images.flatten(0, 1), paddle.to_tensor(tile_index))  # [n_tiles, 3, S, S]
        tile_embeds = self.encode_tiles(tiles)  # [n_tiles, s*s, H]
        image_embeds = format_image_embeddings(
            tile_embeds, crop_array, self.image_newline, self.view_seperator, self.config.global_view_pos
        )  # [n_image_tokens, H]
        return paddle.masked_scatter(
            text_embeds, mask.unsqueeze(-1).expand_as(text_embeds), image_embeds.astype(text_embeds.dtype)
        )  # [B, T, H]

    def _check_image_inputs(
        self, input_ids: paddle.Tensor, images: paddle.Tensor, mask: paddle.Tensor, crops: List[List[Tuple[int, int]]]
    ) -> None:
        """Raise ImageInputError unless images, mask and crops describe the same image tokens."""
        batch, seq_len = input_ids.shape
        size = self.config.vision_config.image_size
        if images.ndim != 5 or images.shape[0] != batch or list(images.shape[2:]) != [3, size, size]:
            raise ImageInputError(
                f"images must have shape [{batch}, max_tiles, 3, {size}, {size}], got {list(images.shape)}; "
                "pass the processor's batched images"
            )
        if list(mask.shape) != [batch, seq_len] or len(crops) != batch:
            raise ImageInputError(
                f"images_seq_mask {list(mask.shape)} and images_spatial_crop (batch {len(crops)}) must match "
                f"input_ids [{batch}, {seq_len}]"
            )
        tiles_used = tiles_per_sample(crops)
        mask_counts = mask.astype("int64").sum(axis=1).numpy()  # [B]
        for b, sample in enumerate(crops):
            if tiles_used[b] > images.shape[1]:
                raise ImageInputError(
                    f"sample {b}: images_spatial_crop needs {tiles_used[b]} tiles but images holds only "
                    f"{images.shape[1]}; images and images_spatial_crop come from different batches"
                )
            expected = sum(self.image_tokens_for(w, h) for w, h in sample)
            if expected != int(mask_counts[b]):
                raise ImageInputError(
                    f"sample {b}: its images make {expected} image embeddings but images_seq_mask marks "
                    f"{int(mask_counts[b])} positions; build input_ids, images_seq_mask and "
                    "images_spatial_crop with the same processor call"
                )

    def forward(
        self,
        input_ids: Optional[paddle.Tensor] = None,
        images: Optional[paddle.Tensor] = None,
        images_seq_mask: Optional[paddle.Tensor] = None,
        images_spatial_crop: Optional[paddle.Tensor] = None,
        attention_mask: Optional[paddle.Tensor] = None,
        labels: Optional[paddle.Tensor] = None,
        inputs_embeds: Optional[paddle.Tensor] = None,
        position_ids: Optional[paddle.Tensor] = None,
        cache: Optional[KVCache] = None,
        logits_to_keep: int = 0,
        **processor_fields,
    ) -> CausalLMOutput:
        """Logits [B, T, V] float32 (and the loss with ``labels``) for a processed batch.

        Takes the processor's batch output as keyword arguments (``model(**inputs)``); images are merged
        by ``prepare_inputs_embeds`` unless ``inputs_embeds`` [B, T, H] are given. In training mode every
        MoE layer adds its load-balancing loss to the gradients (not to the returned loss).
        """
        unknown = set(processor_fields) - _PROCESSOR_ONLY_FIELDS
        if unknown:
            raise TypeError(f"unexpected argument(s) {sorted(unknown)} for DeepseekVLV2ForCausalLM.forward")
        if inputs_embeds is None:
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        return self.language(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, labels=labels, logits_to_keep=logits_to_keep,
        )

    def _prompt_embeds(self, input_ids, images, images_seq_mask, images_spatial_crop):
        with paddle.no_grad():
            return self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)

    def generate(
        self,
        input_ids: paddle.Tensor,
        images: Optional[paddle.Tensor] = None,
        images_seq_mask: Optional[paddle.Tensor] = None,
        images_spatial_crop: Optional[paddle.Tensor] = None,
        attention_mask: Optional[paddle.Tensor] = None,
        config: Optional[GenerationConfig] = None,
        tokenizer=None,
        on_step=None,
        **kwargs,
    ) -> paddle.Tensor:
        """New tokens [B, N] for a processed (left-padded) batch; images are embedded once, at prefill.

        ``kwargs`` are ``GenerationConfig`` fields (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_p``, ``top_k``, ``repetition_penalty``, ``seed``, ``eos_token_id``, ``stop_strings``,
        ``chunk_size`` ...) or processor-only fields, which are ignored. ``on_step`` as in
        ``generation.generate``.
        """
        kwargs = {k: v for k, v in kwargs.items() if k not in _PROCESSOR_ONLY_FIELDS | {"labels"}}
        embeds = self._prompt_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        return generate(self.language, embeds, attention_mask, input_ids, config, tokenizer, on_step=on_step, **kwargs)

    def stream_generate(
        self,
        tokenizer,
        input_ids: paddle.Tensor,
        images: Optional[paddle.Tensor] = None,
        images_seq_mask: Optional[paddle.Tensor] = None,
        images_spatial_crop: Optional[paddle.Tensor] = None,
        attention_mask: Optional[paddle.Tensor] = None,
        config: Optional[GenerationConfig] = None,
        **kwargs,
    ):
        """Like ``generate`` for one prompt, yielding the answer text piece by piece as it is decoded."""
        kwargs = {k: v for k, v in kwargs.items() if k not in _PROCESSOR_ONLY_FIELDS | {"labels"}}
        embeds = self._prompt_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        return stream_generate(self.language, tokenizer, embeds, attention_mask, input_ids, config, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, progress: bool = True, weight_dtype="auto",
                        map_weights: bool = True) -> "DeepseekVLV2ForCausalLM":
        """Load an official DeepSeek-VL2 checkpoint folder as it is (sharded bf16 safetensors, torch layout).

        dtype: the compute dtype; default float32 on CPU and bfloat16 on GPU.
        weight_dtype: "auto" keeps the ``Linear`` matrices of a bf16 checkpoint in bf16 for float32 CPU
        inference where the package's kernels read them (same results, half the memory; such a model
        refuses ``train()``); "float32" (what training needs) keeps every parameter in the compute dtype;
        "bfloat16" insists on bf16 storage. map_weights: bf16-kept matrices are mapped from the shard files
        (fast loads, shared between processes); False reads them into fresh memory (decode steps about 10%
        faster on the benchmark machine, for long-running servers).
        """
        config = DeepseekVLV2Config.from_pretrained(path)
        return build_and_load(
            lambda: cls(config), path, dtype=dtype, progress=progress, weight_dtype=weight_dtype,
            map_weights=map_weights,
        )

    def train(self, mode: bool = True):
        refuse_training_bf16_storage(self, mode)
        return super().train(mode)

    def save_pretrained(self, directory: str, dtype=paddle.bfloat16, assets_from: Optional[str] = None) -> None:
        """Write the official checkpoint layout: config.json, bf16 safetensors shards + index.

        assets_from: a checkpoint folder whose processor and tokenizer files are copied along, so the
        result loads with ``DeepseekVLV2Processor.from_pretrained`` too.
        """
        extra = {"config.json": json.dumps(self.config.to_dict(), indent=1, ensure_ascii=False) + "\n"}
        for name in CHECKPOINT_ASSETS if assets_from else ():
            source = os.path.join(assets_from, name)
            if os.path.isfile(source):
                with open(source, encoding="utf-8") as f:
                    extra[name] = f.read()
        save_weights(self, directory, dtype=dtype, extra_files=extra)
