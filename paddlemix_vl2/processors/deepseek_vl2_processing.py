"""DeepseekVLV2Processor: conversations and images → token ids, image tiles and masks for the model.

Token ids are built turn by turn, exactly as the official processor does (the ids are *not* the
tokenisation of the rendered ``sft_format`` string):

* ``[bos]`` once at the start;
* a ``system`` message (first message only): its stripped content, no separator;
* a user message: the template's rendering of ``(user, content.strip()), (assistant, "")``, i.e.
  ``"<|User|>: {content}\\n\\n<|Assistant|>:"``. Text between ``<image>`` tags is encoded piece by piece and
  each tag becomes ``num_image_tokens(w, h)`` image-token ids;
* an assistant message: ``encode(content.strip()) + [eos]``.

With ``inference_mode`` the final eos (that of the trailing empty assistant turn) is dropped. Tiling is
turned off (every image 1×1) when a conversation has more than 2 images.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
from PIL import Image

from .conversation import Conversation, get_conv_template
from .image_processing import (
    ImageInput,
    ImageTransform,
    load_images,
    num_image_tokens,
    select_best_resolution,
)
from .processor_config import PROCESSOR_CONFIG_FILE, DeepseekVLV2ProcessorConfig, ProcessorConfigError
from .tokenizer import DeepseekTokenizer, UnknownTokenError

__all__ = [
    "DeepseekBatchCollateOutput",
    "DeepseekVLChatProcessorOutput",
    "DeepseekVLV2Processor",
    "DeepseekVLV2ProcessorConfig",
    "ImageTransform",
    "ProcessorConfigError",
    "ProcessorInputError",
    "num_image_tokens",
    "select_best_resolution",
]

GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
CHAT_ROLE_TOKENS = ("<|User|>", "<|Assistant|>")
SYSTEM_ROLES = ("system", "deepseekapi-sys")

Message = Dict[str, Any]


class ProcessorInputError(ValueError):
    """A prompt, conversation or image list the processor cannot turn into model inputs."""


class _DictView:
    """Lets an output be used as ``**outputs`` and ``outputs["input_ids"]``, like the official outputs."""

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(f"{key!r}; available keys: {', '.join(self.keys())}")
        return getattr(self, key)


@dataclasses.dataclass
class DeepseekVLChatProcessorOutput(_DictView):
    """One processed sample, as numpy arrays (``batchify`` turns samples into paddle tensors).

    Fields:
        input_ids: int64 [T].
        target_ids: int64 [T]; ``ignore_id`` at image tokens (and at prompt tokens with ``mask_prompt``).
        images: float32 [n_tiles, 3, S, S]: per image its global view then local tiles; [1, 3, S, S] zeros
            when there is no image.
        images_seq_mask: bool [T], True at image-token positions.
        images_spatial_crop: int64 [n_images, 2] of (num_width_tiles, num_height_tiles); [[0, 0]] if no image.
        num_image_tokens: image tokens per image.
    """

    sft_format: str
    input_ids: np.ndarray
    target_ids: np.ndarray
    images: np.ndarray
    images_seq_mask: np.ndarray
    images_spatial_crop: np.ndarray
    num_image_tokens: List[int]

    @property
    def labels(self) -> np.ndarray:
        return self.target_ids

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass
class DeepseekBatchCollateOutput(_DictView):
    """A padded batch of samples as paddle tensors.

    Fields:
        input_ids: int64 [B, T], padded with the pad id.
        attention_mask: bool [B, T], False at padding.
        labels: int64 [B, T], ``ignore_id`` at padding and image tokens.
        images: float32 [B, max_tiles, 3, S, S], zero tiles as padding.
        images_seq_mask: bool [B, T], True where image embeddings go.
        images_spatial_crop: int64 [B, max_images, 2] of (num_width_tiles, num_height_tiles); (0, 0) = none.
        sft_format: rendered prompt per sample; seq_lens: unpadded length per sample;
        num_image_tokens: image tokens per image, per sample.
    """

    sft_format: List[str]
    input_ids: paddle.Tensor
    labels: paddle.Tensor
    images: paddle.Tensor
    attention_mask: paddle.Tensor
    images_seq_mask: paddle.Tensor
    images_spatial_crop: paddle.Tensor
    seq_lens: List[int]
    num_image_tokens: List[List[int]]

    def to(self, dtype: Union[str, paddle.dtype]) -> "DeepseekBatchCollateOutput":
        """A copy whose ``images`` are cast to ``dtype`` (e.g. "bfloat16"); the integer and mask tensors stay."""
        return dataclasses.replace(self, images=self.images.astype(dtype))


class DeepseekVLV2Processor:
    """Turns prompts or conversations plus images into DeepSeek-VL2 model inputs.

    Attributes:
        tokenizer: the ``DeepseekTokenizer``.
        config: the ``DeepseekVLV2ProcessorConfig``.
        image_transform: the ``ImageTransform`` (normalisation and tiling).
        image_token_id: id of ``<image>``.
    """

    def __init__(self, tokenizer: DeepseekTokenizer, config: DeepseekVLV2ProcessorConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.image_transform = ImageTransform(config.image_mean, config.image_std, config.normalize)
        try:
            # The official processor adds these tokens when missing; every official vocabulary has them, and
            # adding them would create ids the model's embedding table does not have.
            self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
            tokenizer.convert_tokens_to_ids(list(GROUNDING_TOKENS + CHAT_ROLE_TOKENS))
            self._pad_id = (
                tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.convert_tokens_to_ids(config.pad_token)
            )
        except UnknownTokenError as err:
            raise ProcessorConfigError(f"{err}: use the tokenizer files shipped with the checkpoint") from err

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **config_overrides: Any) -> "DeepseekVLV2Processor":
        """Read ``processor_config.json`` and the tokenizer files from a checkpoint folder.

        ``config_overrides`` replace config values, e.g. ``mask_prompt=True`` for answer-only labels.
        """
        config = DeepseekVLV2ProcessorConfig.from_file(os.path.join(os.fspath(path), PROCESSOR_CONFIG_FILE))
        if config_overrides:
            unknown = set(config_overrides) - {f.name for f in dataclasses.fields(config)}
            if unknown:
                raise ProcessorConfigError(f"unknown processor config keys {sorted(unknown)}")
            config = dataclasses.replace(config, **config_overrides)
        return cls(DeepseekTokenizer.from_pretrained(path), config)

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def image_token(self) -> str:
        return self.config.image_token

    def num_image_tokens(self, num_width_tiles: int, num_height_tiles: int) -> int:
        """Image tokens of one image with this processor's tile size, patch size and downsample ratio."""
        return num_image_tokens(
            num_width_tiles, num_height_tiles, self.image_size, self.config.patch_size, self.config.downsample_ratio
        )

    def new_chat_template(self) -> Conversation:
        return get_conv_template(self.config.sft_format)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        """Token ids of ``text`` (no special tokens added by the tokenizer), optionally with bos / eos."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D id sequence; keep ``skip_special_tokens=False`` to see grounding tags."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def format_messages(
        self, conversations: Sequence[Message], sft_format: Optional[str] = None, system_prompt: str = ""
    ) -> str:
        """The whole conversation rendered with the template (returned as ``sft_format``; not tokenised)."""
        conv = get_conv_template(sft_format or self.config.sft_format)
        conv.set_system_message(system_prompt)
        for message in conversations:
            conv.append_message(message["role"], message["content"].strip())
        return conv.get_prompt().strip()

    def format_prompts(self, prompts: str, sft_format: Optional[str] = None, system_prompt: str = "") -> str:
        """A raw prompt rendered as one user turn followed by an empty assistant turn."""
        conv = get_conv_template(sft_format or self.config.sft_format)
        conv.set_system_message(system_prompt)
        conv.append_message(conv.roles[0], prompts.strip())
        conv.append_message(conv.roles[1], "")
        return conv.get_prompt().strip()

    def tokenize_with_images(
        self,
        conversation: str,
        images: Sequence[Image.Image],
        bos: bool = True,
        eos: bool = True,
        cropping: bool = True,
    ) -> Tuple[List[int], List[np.ndarray], List[bool], List[List[int]], List[int]]:
        """Tokenise text whose ``<image>`` tags stand for ``images`` (RGB PIL images, in order).

        Returns:
            token ids, the image tiles (float32 [3, S, S] each; per image its global view then its local
            tiles row-major), the image-token mask (one bool per id), the (num_width_tiles,
            num_height_tiles) of each image, and the number of image tokens of each image.
        """
        tag_count = conversation.count(self.image_token)
        if tag_count != len(images):
            raise ProcessorInputError(
                f"the text has {tag_count} {self.image_token} tags but {len(images)} images were given: "
                f"put one {self.image_token} tag where each image goes"
            )
        text_pieces = conversation.split(self.image_token)
        token_ids: List[int] = [self.bos_id] if bos else []
        seq_mask: List[bool] = [False] * len(token_ids)
        tiles: List[np.ndarray] = []
        spatial_crop: List[List[int]] = []
        image_token_counts: List[int] = []
        for text_piece, image in zip(text_pieces, images):
            # Each text piece is encoded on its own, so BPE merges never cross an image.
            piece_ids = self.encode(text_piece, bos=False, eos=False)
            tile_grid = self._tile_grid(image.size, cropping)
            tiles.extend(self.image_transform.tiles(image, tile_grid, self.image_size))
            n_tokens = self.num_image_tokens(*tile_grid)
            token_ids += piece_ids + [self.image_token_id] * n_tokens
            seq_mask += [False] * len(piece_ids) + [True] * n_tokens
            spatial_crop.append(list(tile_grid))
            image_token_counts.append(n_tokens)
        last_piece_ids = self.encode(text_pieces[-1], bos=False, eos=eos)
        token_ids += last_piece_ids
        seq_mask += [False] * len(last_piece_ids)
        return token_ids, tiles, seq_mask, spatial_crop, image_token_counts

    def _tile_grid(self, image_size: Tuple[int, int], cropping: bool) -> Tuple[int, int]:
        """(num_width_tiles, num_height_tiles) for an image of (width, height) ``image_size``."""
        if not cropping:
            return 1, 1
        best_width, best_height = select_best_resolution(image_size, self.config.candidate_resolutions)
        return best_width // self.image_size, best_height // self.image_size

    def _user_turn_prompt(self, conv: Conversation, content: str) -> str:
        """One user turn followed by an empty assistant turn, e.g. "<|User|>: {content}\\n\\n<|Assistant|>:"."""
        conv.reset_message()
        conv.append_message(conv.roles[0], content.strip())
        conv.append_message(conv.roles[1], "")
        return conv.get_prompt()

    def _check_messages(self, messages: Sequence[Message], num_images: int) -> None:
        """Raise ProcessorInputError for malformed messages or a tag / image count mismatch."""
        if not messages:
            raise ProcessorInputError("the conversation is empty: give at least one user message")
        conv = self.new_chat_template()
        user_roles, assistant_roles = (conv.roles[0], "user"), (conv.roles[1], "assistant")
        known_roles = user_roles + assistant_roles + SYSTEM_ROLES
        tag_count = 0
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or not isinstance(message.get("content"), str):
                raise ProcessorInputError(
                    f"message {index} must be a dict with a 'role' and a string 'content', got {message!r}"
                )
            role = message["role"]
            if role not in known_roles:
                raise ProcessorInputError(
                    f"message {index} has unknown role {role!r}; use one of {', '.join(map(repr, known_roles))}"
                )
            if role in user_roles:
                tag_count += self._user_turn_prompt(conv, message["content"]).count(self.image_token)
            elif self.image_token in message["content"]:
                raise ProcessorInputError(
                    f"message {index} ({role!r}) contains {self.image_token}: images belong in user messages"
                )
            if role in SYSTEM_ROLES and index != 0:
                raise ProcessorInputError(f"the system message must be the first message, found it at {index}")
        if tag_count != num_images:
            listed_only = num_images == 0 and any(message.get("images") for message in messages)
            hint = " (the messages' 'images' lists are not read: pass the images with images=)" if listed_only else ""
            raise ProcessorInputError(
                f"the conversation has {tag_count} {self.image_token} tags but {num_images} images were given: "
                f"put one {self.image_token} tag in a user message for each image{hint}"
            )

    def format_messages_v2(
        self, messages: Sequence[Message], pil_images: Sequence[Image.Image]
    ) -> Tuple[List[int], List[int], List[np.ndarray], List[bool], List[List[int]], List[int]]:
        """Token ids and labels of a conversation, built turn by turn (see the module docstring).

        ``pil_images`` are all images of the conversation, in the order of their tags; each user turn takes
        as many as it has tags. Returns (input ids, labels, image tiles, image-token mask, spatial crops,
        image tokens per image), with ``tokenize_with_images``'s types.
        """
        self._check_messages(messages, len(pil_images))
        conv = self.new_chat_template()
        template_system_message = conv.system_message
        user_roles, assistant_roles = (conv.roles[0], "user"), (conv.roles[1], "assistant")
        cropping = len(pil_images) <= 2
        ignore = self.config.ignore_id
        # NOTE(port): bos is a label even with mask_prompt, as in the reference; it drops out after the shift.
        token_ids, labels, seq_mask = [self.bos_id], [self.bos_id], [False]
        tiles: List[np.ndarray] = []
        spatial_crop: List[List[int]] = []
        image_token_counts: List[int] = []
        image_index = 0
        for index, message in enumerate(messages):
            role = message["role"]
            # Only the first turn carries the template's own system message.
            conv.system_message = template_system_message if index == 0 else ""
            if role in user_roles:
                prompt = self._user_turn_prompt(conv, message["content"])
                n_images = prompt.count(self.image_token)
                turn_ids, turn_tiles, turn_mask, turn_crop, turn_counts = self.tokenize_with_images(
                    prompt, pil_images[image_index : image_index + n_images], bos=False, eos=False, cropping=cropping
                )
                image_index += n_images
                token_ids += turn_ids
                labels += [ignore] * len(turn_ids) if self.config.mask_prompt else turn_ids
                seq_mask += turn_mask
                tiles += turn_tiles
                spatial_crop += turn_crop
                image_token_counts += turn_counts
            elif role in assistant_roles:
                turn_ids = self.encode(message["content"].strip(), bos=False, eos=True)
                token_ids += turn_ids
                labels += turn_ids
                seq_mask += [False] * len(turn_ids)
            else:
                turn_ids = self.encode(message["content"].strip(), bos=False, eos=False)
                token_ids += turn_ids
                labels += [ignore] * len(turn_ids) if self.config.mask_prompt else turn_ids
                seq_mask += [False] * len(turn_ids)
        return token_ids, labels, tiles, seq_mask, spatial_crop, image_token_counts

    def process_one(
        self,
        prompt: Optional[str] = None,
        conversations: Optional[Sequence[Message]] = None,
        images: Optional[Sequence[ImageInput]] = None,
        apply_sft_format: bool = False,
        inference_mode: bool = True,
        system_prompt: str = "",
    ) -> DeepseekVLChatProcessorOutput:
        """Process one prompt or one conversation and its images.

        Args:
            prompt: an already formatted prompt (wrapped in the template first if ``apply_sft_format``); it
                gets bos, and eos unless ``inference_mode``.
            conversations: messages ``{"role", "content"}``; roles ``<|User|>``/``user``,
                ``<|Assistant|>``/``assistant``, and ``system`` as the first message only. In inference
                mode the last message must be an empty assistant turn.
            images: PIL images or file paths, one per ``<image>`` tag, in order.
            apply_sft_format: see ``prompt``; conversations are always formatted.
            inference_mode: drop the final eos, so the model writes the answer.
            system_prompt: only changes the returned ``sft_format`` string, never the ids.
        """
        if (prompt is None) == (conversations is None):
            raise ProcessorInputError("pass exactly one of prompt= or conversations=")
        if isinstance(images, (Image.Image, str, os.PathLike)):
            raise ProcessorInputError("images must be a list of PIL images or paths, not a single image")
        pil_images = load_images(images or [])
        if prompt is None:
            token_ids, labels, tiles, seq_mask, spatial_crop, image_token_counts = self.format_messages_v2(
                conversations, pil_images
            )
            if inference_mode:
                self._check_ends_with_empty_answer(conversations)
            sft_format = self.format_messages(conversations, system_prompt=system_prompt)
        else:
            sft_format = self.format_prompts(prompt, system_prompt=system_prompt) if apply_sft_format else prompt
            token_ids, tiles, seq_mask, spatial_crop, image_token_counts = self.tokenize_with_images(
                sft_format, pil_images, bos=True, eos=True, cropping=len(pil_images) <= 2
            )
            labels = token_ids

        input_ids = np.asarray(token_ids, dtype=np.int64)
        target_ids = np.asarray(labels, dtype=np.int64)
        target_ids[input_ids == self.image_token_id] = self.config.ignore_id
        images_seq_mask = np.asarray(seq_mask, dtype=bool)
        if inference_mode:
            # The last id is the eos of the trailing (empty) assistant turn, or of the prompt.
            input_ids, target_ids, images_seq_mask = input_ids[:-1], target_ids[:-1], images_seq_mask[:-1]

        if tiles:
            pixel_tiles = np.stack(tiles)
            images_spatial_crop = np.asarray(spatial_crop, dtype=np.int64)
        else:
            pixel_tiles = np.zeros((1, 3, self.image_size, self.image_size), dtype=np.float32)
            images_spatial_crop = np.zeros((1, 2), dtype=np.int64)
        return DeepseekVLChatProcessorOutput(
            sft_format=sft_format,
            input_ids=input_ids,
            target_ids=target_ids,
            images=pixel_tiles,
            images_seq_mask=images_seq_mask,
            images_spatial_crop=images_spatial_crop,
            num_image_tokens=image_token_counts,
        )

    def _check_ends_with_empty_answer(self, messages: Sequence[Message]) -> None:
        """Inference mode drops the final eos, which only the trailing empty assistant turn provides."""
        conv = self.new_chat_template()
        last = messages[-1]
        if last["role"] not in (conv.roles[1], "assistant") or last["content"].strip():
            raise ProcessorInputError(
                f"in inference mode the conversation must end with an empty assistant turn: append "
                f'{{"role": "{conv.roles[1]}", "content": ""}} (or pass inference_mode=False for training)'
            )

    def __call__(
        self,
        *,
        prompt: Optional[str] = None,
        conversations: Optional[Sequence[Message]] = None,
        images: Optional[Sequence[ImageInput]] = None,
        apply_sft_format: bool = False,
        force_batchify: bool = True,
        inference_mode: bool = True,
        system_prompt: str = "",
    ) -> Union[DeepseekBatchCollateOutput, DeepseekVLChatProcessorOutput]:
        """``process_one`` and, with ``force_batchify`` (the default), ``batchify`` into a batch of one."""
        sample = self.process_one(
            prompt=prompt,
            conversations=conversations,
            images=images,
            apply_sft_format=apply_sft_format,
            inference_mode=inference_mode,
            system_prompt=system_prompt,
        )
        return self.batchify([sample]) if force_batchify else sample

    def batchify(
        self, sample_list: Sequence[DeepseekVLChatProcessorOutput], padding: Literal["left", "right"] = "left"
    ) -> DeepseekBatchCollateOutput:
        """Pad samples to one batch: ids with the pad id, labels with ``ignore_id``, masks with False,
        image tiles with zero tiles and spatial crops with (0, 0). Left padding suits generation."""
        if padding not in ("left", "right"):
            raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
        if not sample_list:
            raise ProcessorInputError("batchify needs at least one sample")
        seq_lens = [len(sample) for sample in sample_list]
        batch, max_len = len(sample_list), max(seq_lens)
        input_ids = np.full((batch, max_len), self.pad_id, dtype=np.int64)
        labels = np.full((batch, max_len), self.config.ignore_id, dtype=np.int64)
        attention_mask = np.zeros((batch, max_len), dtype=bool)
        images_seq_mask = np.zeros((batch, max_len), dtype=bool)
        max_tiles = max(sample.images.shape[0] for sample in sample_list)
        max_images = max(sample.images_spatial_crop.shape[0] for sample in sample_list)
        images = np.zeros((batch, max_tiles) + sample_list[0].images.shape[1:], dtype=np.float32)
        images_spatial_crop = np.zeros((batch, max_images, 2), dtype=np.int64)
        for row, sample in enumerate(sample_list):
            length = seq_lens[row]
            columns = slice(max_len - length, max_len) if padding == "left" else slice(0, length)
            input_ids[row, columns] = sample.input_ids
            labels[row, columns] = sample.target_ids
            attention_mask[row, columns] = True
            images_seq_mask[row, columns] = sample.images_seq_mask
            images[row, : sample.images.shape[0]] = sample.images
            images_spatial_crop[row, : sample.images_spatial_crop.shape[0]] = sample.images_spatial_crop
        return DeepseekBatchCollateOutput(
            sft_format=[sample.sft_format for sample in sample_list],
            input_ids=paddle.to_tensor(input_ids),
            labels=paddle.to_tensor(labels),
            images=paddle.to_tensor(images),
            attention_mask=paddle.to_tensor(attention_mask),
            images_seq_mask=paddle.to_tensor(images_seq_mask),
            images_spatial_crop=paddle.to_tensor(images_spatial_crop),
            seq_lens=seq_lens,
            num_image_tokens=[list(sample.num_image_tokens) for sample in sample_list],
        )
