"""Fine-tuning DeepSeek-VL2: data, LoRA, the training loop, checkpoints; see README.md in this folder."""
from .build import load_model_for_training, prepare_model
from .data import (
    DatasetFormatError,
    DatasetReport,
    FinetuneCollator,
    FinetuneDataset,
    Record,
    SkippedRecord,
    load_dataset,
)
from .files import StateFileError
from .lora import (
    DEFAULT_TARGET_MODULES,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    apply_lora,
    load_adapters,
    merge_lora,
    save_adapters,
)
from .parts import freeze_parts
from .state import latest_checkpoint
from .trainer import Trainer, TrainingConfig, learning_rate_at

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "DatasetFormatError",
    "DatasetReport",
    "FinetuneCollator",
    "FinetuneDataset",
    "LoRAConfig",
    "LoRAError",
    "LoRALinear",
    "Record",
    "SkippedRecord",
    "StateFileError",
    "Trainer",
    "TrainingConfig",
    "apply_lora",
    "freeze_parts",
    "latest_checkpoint",
    "learning_rate_at",
    "load_adapters",
    "load_dataset",
    "load_model_for_training",
    "merge_lora",
    "prepare_model",
    "save_adapters",
]
