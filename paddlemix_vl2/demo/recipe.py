"""The demo model's recipe: its sizes, the processor settings, the training settings, and the
random-initialisation checkpoint that training starts from.

The architecture is DeepSeek-VL2's, only small: a SigLIP-style ViT on 384-px tiles (16 x 16 patches of
24 px), the 2 x 2 downsampling MLP projector (8 x 8 tokens per view), the 2-D tile layout with
``image_newline`` and ``view_seperator``, and a DeepSeek-V2 language model with multi-head latent
attention, a dense first layer and mixture-of-experts layers with routed and shared experts.

``candidate_resolutions`` is restricted to ``[[384, 384]]``: every image becomes the global view plus one
384-px local tile (145 image tokens), through the same tiling code as the official 23 candidates. The
official list would give 2 x 2 local tiles to most images (2.5x the vision work per image), which the
60-minute CPU budget cannot afford.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict

import numpy as np
import paddle

from ..models.deepseek_vl2 import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
from ..processors.processor_config import PROCESSOR_CONFIG_FILE
from .vocabulary import PAD_TOKEN, write_tokenizer_files

__all__ = [
    "DemoModelSizes",
    "DemoTrainingSettings",
    "TILE_SIZE",
    "model_config_dict",
    "processor_config_dict",
    "sincos_position_embedding",
    "build_initial_model",
    "write_initial_checkpoint",
]

TILE_SIZE = 384
# SigLIP-so400m's MLP ratio (4304 / 1152), as in the official vision configs.
VISION_MLP_RATIO = 3.7362


@dataclass(frozen=True)
class DemoModelSizes:
    """Widths and depths of the demo model (the tile stays 384 px).

    The 24-px patch (16 x 16 patches, 8 x 8 tokens per view after the 2 x 2 merge, 145 image tokens per
    image) makes a training step about 3x cheaper than the official 14 px (729 patches, 421 tokens): the
    60-minute CPU budget buys 3x the steps. The token layout (global view, newlines, separator, local
    tile) is the official one either way.
    """

    patch_size: int = 24
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    hidden_size: int = 192
    # The first one dense, the rest mixture-of-experts. With 3 the colour of an asked shape among several
    # stayed near 0.6 (it needs three steps of attention); 6 reached 0.945 (README.md).
    num_layers: int = 6
    num_heads: int = 4
    kv_lora_rank: int = 96
    qk_nope_head_dim: int = 48
    qk_rope_head_dim: int = 16
    v_head_dim: int = 48
    dense_intermediate_size: int = 576
    moe_intermediate_size: int = 192
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1


@dataclass(frozen=True)
class DemoTrainingSettings:
    """Data sets, seeds and optimisation of the two stages of the demo run (stage 2 uses the trainer's
    ``TrainingConfig`` field names; both share the weight decay, betas and clipping)."""

    # Stage 1, the vision tower alone (``vision_pretraining``): scenes drawn on the fly, one epoch.
    # 1,800 steps: the number of (colour, shape) pairs a linear probe finds present matched the true count
    # in 0.81 of fresh scenes after 900 steps and 0.96 after 1,800, and the count answers follow it.
    vision_images: int = 28800
    vision_seed: int = 4
    vision_batch_size: int = 16  # over all processes
    vision_learning_rate: float = 1e-3
    vision_warmup_steps: int = 50
    # Weights of the hundreds-digit, box and count heads beside the presence loss (``pretraining_loss``).
    # Zero: with 0.3 / 2.0 / 0.1 the whole command's model grounded better but named shapes and colours
    # worse than the shipped one (README.md); at zero the stage trains exactly as the shipped model's did.
    vision_digit_weight: float = 0.0
    vision_box_weight: float = 0.0
    vision_count_weight: float = 0.0
    # Stage 2, the projector and the language model on the questions (the tower stays frozen).
    train_images: int = 15000
    dataset_seed: int = 1
    init_seed: int = 2
    train_seed: int = 3
    num_train_epochs: float = 1.5  # 1,407 steps at about 1.5 s: with the 1,800-step stage 1 the hour holds
    train_batch_size: int = 16  # conversations per step over all processes
    gradient_accumulation_steps: int = 1
    # With the frozen tower 1e-3 answered 5 and 2 more questions right than 6e-4 on the two 100-image
    # checks (README.md). In the earlier one-stage runs (tower trained with the LM) 1e-3 .. 3e-3 had left
    # the colour question at chance for hundreds of steps.
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.05
    adam_beta2: float = 0.98
    max_grad_norm: float = 1.0

    def replace(self, **changes: Any) -> "DemoTrainingSettings":
        return dataclasses.replace(self, **changes)


def _language_config(sizes: DemoModelSizes, vocab_size: int) -> Dict[str, Any]:
    return {
        "model_type": "deepseek_v2",
        "vocab_size": vocab_size,
        "hidden_size": sizes.hidden_size,
        "intermediate_size": sizes.dense_intermediate_size,
        "moe_intermediate_size": sizes.moe_intermediate_size,
        "num_hidden_layers": sizes.num_layers,
        "num_attention_heads": sizes.num_heads,
        "num_key_value_heads": sizes.num_heads,
        "use_mla": True,
        "q_lora_rank": None,
        "kv_lora_rank": sizes.kv_lora_rank,
        "qk_nope_head_dim": sizes.qk_nope_head_dim,
        "qk_rope_head_dim": sizes.qk_rope_head_dim,
        "v_head_dim": sizes.v_head_dim,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_routed_experts": sizes.n_routed_experts,
        "num_experts_per_tok": sizes.num_experts_per_tok,
        "n_shared_experts": sizes.n_shared_experts,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "lm_head": True,
        "rm_head": False,
        "torch_dtype": "bfloat16",
    }


def model_config_dict(sizes: DemoModelSizes, vocab_size: int) -> Dict[str, Any]:
    """The official-style ``config.json`` contents of the demo model."""
    return {
        "model_type": "deepseek_vl_v2",
        "tile_tag": "2D",
        "global_view_pos": "head",
        "candidate_resolutions": [[TILE_SIZE, TILE_SIZE]],
        "torch_dtype": "bfloat16",
        "vision_config": {
            "model_type": "vision",
            "model_name": "siglip_so400m_patch14_384",
            "image_size": TILE_SIZE,
            "patch_size": sizes.patch_size,
            "width": sizes.vision_width,
            "layers": sizes.vision_layers,
            "heads": sizes.vision_heads,
            "mlp_ratio": VISION_MLP_RATIO,
            "global_pool": "map",
            "ignore_head": True,
            "class_token": False,
            "num_classes": 0,
            "weight_init": "skip",
        },
        "projector_config": {
            "model_type": "mlp_projector",
            "projector_type": "downsample_mlp_gelu",
            "input_dim": sizes.vision_width,
            "n_embed": sizes.hidden_size,
            "depth": 2,
            "mlp_ratio": 1,
            "downsample_ratio": 2,
        },
        "language_config": _language_config(sizes, vocab_size),
    }


def processor_config_dict(sizes: DemoModelSizes) -> Dict[str, Any]:
    """``processor_config.json``: the official values, with the single 384 x 384 candidate resolution."""
    return {
        "add_special_token": False,
        "candidate_resolutions": [[TILE_SIZE, TILE_SIZE]],
        "downsample_ratio": 2,
        "ignore_id": -100,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_token": "<image>",
        "mask_prompt": False,
        "normalize": True,
        "pad_token": PAD_TOKEN,
        "patch_size": sizes.patch_size,
        "processor_class": "DeepseekVLV2Processor",
        "sft_format": "deepseek",
    }


def sincos_position_embedding(grid: int, width: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position table [1, grid*grid, width] in the ViT's row-major patch order.

    The first half of the channels encodes the column, the second half the row, each as sines and
    cosines of ``width / 4`` geometric frequencies (MAE's table). Used as the initial value of the
    trainable ``pos_embed``: from a random table the tower first has to discover the patch grid, which
    grounding depends on.
    """
    if width % 4:
        raise ValueError(f"vision width {width} must be a multiple of 4 for the sine-cosine position table")
    frequencies = 1.0 / 10000 ** (np.arange(width // 4) / (width / 4))  # [width/4]
    rows, columns = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = []
    for coordinate in (columns.reshape(-1), rows.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None]  # [grid*grid, width/4]
        parts += [np.sin(angles), np.cos(angles)]
    return np.concatenate(parts, axis=1).astype(np.float32)[None]


def build_initial_model(sizes: DemoModelSizes, vocab_size: int, seed: int) -> DeepseekVLV2ForCausalLM:
    """The randomly initialised demo model (Paddle's default initialisers seeded with ``seed``), with the
    sine-cosine table as its initial ViT position embedding."""
    config = DeepseekVLV2Config.from_dict(model_config_dict(sizes, vocab_size))
    paddle.seed(seed)
    model = DeepseekVLV2ForCausalLM(config)
    vision = config.vision_config
    model.vision.pos_embed.set_value(paddle.to_tensor(sincos_position_embedding(vision.grid_size, vision.width)))
    return model


def write_initial_checkpoint(directory: str, sizes: DemoModelSizes, seed: int) -> DeepseekVLV2ForCausalLM:
    """Write the random-initialisation checkpoint in the official layout (config.json, bf16 safetensors,
    processor_config.json, tokenizer files) to ``directory``; returns the model."""
    with tempfile.TemporaryDirectory(prefix="demo-assets-") as assets:
        vocab_size = write_tokenizer_files(assets)
        with open(os.path.join(assets, PROCESSOR_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(processor_config_dict(sizes), f, indent=1, ensure_ascii=False)
            f.write("\n")
        model = build_initial_model(sizes, vocab_size, seed)
        model.save_pretrained(directory, assets_from=assets)
    return model
