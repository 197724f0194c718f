"""DeepSeek-VL2 model classes under their official (and PaddleMIX) names."""
from ... import paddle_required  # noqa: F401 (first: checks Paddle)
from .checkpoint import CheckpointError
from .configuration_deepseek import (
    ConfigError,
    DeepseekV2Config,
    DeepseekVLV2Config,
    MlpProjectorConfig,
    VisionEncoderConfig,
)
from .kv_cache import KVCache
from .layers import DeepseekV2MLP, DeepseekV2RMSNorm
from .attention import DeepseekV2Attention, DeepseekV2MHAAttention
from .moe import DeepseekV2MoE, MoEGate
from .modeling_deepseek import CausalLMOutput, DeepseekV2DecoderLayer, DeepseekV2ForCausalLM, DeepseekV2Model
from .siglip_vit import SigLIPVisionTransformer, VisionTransformer
from .projector import DeepseekVLMlpProjector, MlpProjector
from .modeling_deepseek_vl_v2 import DeepseekVLV2ForCausalLM, ImageInputError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DeepseekV2Config",
    "DeepseekVLV2Config",
    "MlpProjectorConfig",
    "VisionEncoderConfig",
    "KVCache",
    "DeepseekV2MLP",
    "DeepseekV2RMSNorm",
    "DeepseekV2Attention",
    "DeepseekV2MHAAttention",
    "DeepseekV2MoE",
    "MoEGate",
    "DeepseekV2DecoderLayer",
    "DeepseekV2ForCausalLM",
    "DeepseekV2Model",
    "CausalLMOutput",
    "SigLIPVisionTransformer",
    "VisionTransformer",
    "DeepseekVLMlpProjector",
    "MlpProjector",
    "DeepseekVLV2ForCausalLM",
    "ImageInputError",
]
