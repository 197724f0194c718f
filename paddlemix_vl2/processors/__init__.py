"""Tokenizer, conversation templates and the DeepSeek-VL2 processor."""
from .conversation import CONV_TEMPLATES, Conversation, SeparatorStyle, UnknownTemplateError, get_conv_template
from .deepseek_vl2_processing import (
    DeepseekBatchCollateOutput,
    DeepseekVLChatProcessorOutput,
    DeepseekVLV2Processor,
    DeepseekVLV2ProcessorConfig,
    ProcessorConfigError,
    ProcessorInputError,
)
from .image_processing import (
    ImageLoadError,
    ImageTransform,
    downsampled_grid_size,
    load_image,
    load_images,
    num_image_tokens,
    select_best_resolution,
)
from .tokenizer import DeepseekTokenizer, TokenizerFileError, UnknownTokenError

__all__ = [
    "CONV_TEMPLATES",
    "Conversation",
    "DeepseekBatchCollateOutput",
    "DeepseekTokenizer",
    "DeepseekVLChatProcessorOutput",
    "DeepseekVLV2Processor",
    "DeepseekVLV2ProcessorConfig",
    "ImageLoadError",
    "ImageTransform",
    "ProcessorConfigError",
    "ProcessorInputError",
    "SeparatorStyle",
    "TokenizerFileError",
    "UnknownTemplateError",
    "UnknownTokenError",
    "downsampled_grid_size",
    "get_conv_template",
    "load_image",
    "load_images",
    "num_image_tokens",
    "select_best_resolution",
]
