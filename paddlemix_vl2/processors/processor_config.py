"""``processor_config.json``: the typed settings of the DeepSeek-VL2 processor."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Tuple, Union

from ..json_files import read_json_object
from .conversation import get_conv_template

__all__ = ["PROCESSOR_CONFIG_FILE", "DeepseekVLV2ProcessorConfig", "ProcessorConfigError"]

PROCESSOR_CONFIG_FILE = "processor_config.json"


class ProcessorConfigError(ValueError):
    """``processor_config.json`` is unreadable or holds a value the processor cannot use."""


@dataclasses.dataclass
class DeepseekVLV2ProcessorConfig:
    """Contents of ``processor_config.json``; defaults are those of the official processor class.

    ``image_size`` (the tile side, 384) is the width of the first candidate resolution.
    """

    candidate_resolutions: List[Tuple[int, int]]
    patch_size: int = 14
    downsample_ratio: int = 2
    image_mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    normalize: bool = True
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"
    add_special_token: bool = False
    sft_format: str = "deepseek"
    # NOTE(port): the class default is True, but every official processor_config.json sets false.
    mask_prompt: bool = True
    ignore_id: int = -100
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        resolutions = [tuple(int(side) for side in pair) for pair in self.candidate_resolutions]
        if not resolutions or any(len(pair) != 2 or min(pair) <= 0 for pair in resolutions):
            raise ProcessorConfigError(
                f"candidate_resolutions must be a non-empty list of positive [width, height] pairs, "
                f"got {self.candidate_resolutions!r}"
            )
        self.candidate_resolutions = resolutions
        tile = resolutions[0][0]
        if any(side % tile for pair in resolutions for side in pair):
            raise ProcessorConfigError(f"every candidate resolution must be a multiple of the tile size {tile}")
        get_conv_template(self.sft_format)

    @property
    def image_size(self) -> int:
        return self.candidate_resolutions[0][0]

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "DeepseekVLV2ProcessorConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "candidate_resolutions" not in data:
            raise ProcessorConfigError("processor config has no candidate_resolutions")
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "DeepseekVLV2ProcessorConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: pass the checkpoint folder that holds {PROCESSOR_CONFIG_FILE}")
        return cls.from_dict(read_json_object(path, ProcessorConfigError, "re-download it from the checkpoint"))
