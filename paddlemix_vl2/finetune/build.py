"""Load a DeepSeek-VL2 checkpoint for training and choose what trains (LoRA adapters or whole parts)."""
from __future__ import annotations

import logging
from typing import Optional

from ..models.deepseek_vl2 import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
from ..models.deepseek_vl2.checkpoint import build_and_load
from .lora import LoRAConfig, apply_lora
from .parts import count_parameters, freeze_parts

__all__ = ["load_model_for_training", "prepare_model"]

logger = logging.getLogger(__name__)


def load_model_for_training(
    model_path: str,
    dtype=None,
    aux_loss_alpha: Optional[float] = None,
    seq_aux: Optional[bool] = None,
    progress: bool = True,
) -> DeepseekVLV2ForCausalLM:
    """The checkpoint at ``model_path`` in train mode, with the MoE load-balancing settings overridden
    when given (``aux_loss_alpha`` 0 turns the aux loss off). ``dtype``: float32 on CPU, bf16 on GPU by default."""
    config = DeepseekVLV2Config.from_pretrained(model_path)
    language = config.language_config
    if aux_loss_alpha is not None:
        if aux_loss_alpha < 0:
            raise ValueError(f"--aux_loss_alpha must be >= 0, got {aux_loss_alpha}")
        language.aux_loss_alpha = aux_loss_alpha
    if seq_aux is not None:
        language.seq_aux = seq_aux
    if language.moe_topk_method == "noaux_tc":
        logger.warning(
            "%s routes with noaux_tc, which the official model refuses to train; here the router trains "
            "without a load-balancing loss and e_score_correction_bias stays fixed", model_path
        )
    model = build_and_load(lambda: DeepseekVLV2ForCausalLM(config), model_path, dtype=dtype, progress=progress)
    model.train()
    return model


def prepare_model(
    model: DeepseekVLV2ForCausalLM,
    lora_config: Optional[LoRAConfig] = None,
    freeze_vision: bool = False,
    freeze_projector: bool = False,
    freeze_language: bool = False,
) -> None:
    """Make the chosen parameters trainable: LoRA adapters only (every base weight frozen), or every
    parameter outside the frozen parts."""
    if lora_config is not None:
        wrapped = apply_lora(model, lora_config)
        logger.info("LoRA (r=%d, alpha=%g) on %d Linear layers", lora_config.r, lora_config.lora_alpha, len(wrapped))
    else:
        freeze_parts(model, vision=freeze_vision, projector=freeze_projector, language=freeze_language)
    trainable, total = count_parameters(model)
    logger.info("%s of %s parameters train (%.2f%%)", f"{trainable:,}", f"{total:,}", 100.0 * trainable / total)
