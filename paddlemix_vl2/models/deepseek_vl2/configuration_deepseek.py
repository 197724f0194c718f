"""Typed configuration objects read from an official DeepSeek-VL2 ``config.json``.

The official files are sparse: every key a file leaves out takes the default of the official config
class, so the defaults below are copied exactly (including the misspelled ``topk_method='gready'``).
Keys this port does not use are kept in ``extra`` so ``to_dict`` writes the file back unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ...json_files import read_json_object

__all__ = [
    "ConfigError",
    "DeepseekV2Config",
    "VisionEncoderConfig",
    "MlpProjectorConfig",
    "DeepseekVLV2Config",
]

TOPK_METHODS = ("greedy", "gready", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn")
PROJECTOR_TYPES = ("identity", "linear", "mlp_gelu", "downsample_mlp_gelu")


class ConfigError(ValueError):
    """A config.json value this port cannot run; the message names the key and the accepted values."""


def _split_known(cls, data: Dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    return known, extra


# JSON types a field of each annotation accepts (a JSON integer is a valid float).
_JSON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


class _ConfigBase:
    SECTION = ""  # the key of this part in config.json, for messages
    POSITIVE: tuple = ()  # sizes that must be at least 1

    @classmethod
    def from_dict(cls, data: Dict[str, Any]):
        known, extra = _split_known(cls, dict(data))
        cls._check_values(known)
        return cls(**known, extra=extra)

    @classmethod
    def _check_values(cls, known: Dict[str, Any]) -> None:
        """A value of the wrong JSON type (``"hidden_size": "big"``) or a size below 1 is a ConfigError naming
        the key, where it would otherwise fail later with a message about something else."""
        for spec in dataclasses.fields(cls):
            if spec.name not in known:
                continue
            value, annotation = known[spec.name], spec.type
            optional = annotation.startswith("Optional[")
            accepted = _JSON_TYPES.get(annotation[len("Optional["):-1] if optional else annotation)
            if accepted is None or (value is None and optional):
                continue
            if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
                raise ConfigError(f"{cls.SECTION}.{spec.name}={value!r} must be of type {annotation}; fix config.json")
            if spec.name in cls.POSITIVE and value < 1:
                raise ConfigError(f"{cls.SECTION}.{spec.name}={value!r} must be at least 1; fix config.json")

    def to_dict(self) -> Dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


@dataclass
class DeepseekV2Config(_ConfigBase):
    """The DeepSeek-V2 MoE language model (``language_config``); defaults are the official ones."""

    SECTION = "language_config"
    POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "ep_size", "moe_layer_freq")

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 32
    n_shared_experts: Optional[int] = None
    n_routed_experts: Optional[int] = None
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: Optional[int] = 512
    q_lora_rank: Optional[int] = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    # NOTE(port): the official default really is the typo 'gready'; it behaves as 'greedy'.
    topk_method: str = "gready"
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_mla: bool = True
    model_type: str = "deepseek_v2"
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(
                f"language_config.topk_method={self.topk_method!r} is not supported; "
                f"use one of {', '.join(TOPK_METHODS[:1] + TOPK_METHODS[2:])}"
            )
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(
                f"language_config.scoring_func={self.scoring_func!r} is not supported; use softmax or sigmoid"
            )
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ConfigError(f"language_config.rope_scaling={self.rope_scaling!r} must be null or an object "
                                  f"with a type ({', '.join(ROPE_SCALING_TYPES)})")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ROPE_SCALING_TYPES:
                raise ConfigError(
                    f"language_config.rope_scaling type {kind!r} is not supported; "
                    f"use null or one of {', '.join(ROPE_SCALING_TYPES)}"
                )
        if self.hidden_act != "silu":
            raise ConfigError(f"language_config.hidden_act={self.hidden_act!r} is not supported; use silu")
        if self.n_routed_experts is not None and self.n_routed_experts % self.ep_size:
            raise ConfigError(
                f"n_routed_experts={self.n_routed_experts} is not divisible by ep_size={self.ep_size}"
            )
        if self.n_routed_experts is not None:
            self._check_routing()
        if self.use_mla and not self.kv_lora_rank:
            raise ConfigError("language_config.use_mla is true but kv_lora_rank is not set; set kv_lora_rank")

    def _check_routing(self) -> None:
        """The router's sizes must fit together (``moe.route`` and the decode kernels rely on it)."""
        experts, k = self.n_routed_experts, self.num_experts_per_tok
        if not k or not 1 <= k <= experts:
            raise ConfigError(f"language_config.num_experts_per_tok={k!r} must be between 1 and "
                              f"n_routed_experts={experts}")
        if self.moe_topk_method == "greedy":
            return
        groups, kept = self.n_group, self.topk_group
        if not groups or experts % groups or not kept or not 1 <= kept <= groups:
            raise ConfigError(f"language_config.n_group={groups!r} and topk_group={kept!r} must divide the "
                              f"{experts} experts into groups and keep 1 to n_group of them ({self.topk_method})")
        if self.moe_topk_method == "noaux_tc" and experts // groups < 2:
            raise ConfigError(f"language_config.n_group={groups} leaves groups of one expert; noaux_tc scores a "
                              "group by its best two, so use at most half as many groups as experts")

    @property
    def q_head_dim(self) -> int:
        """Width of one MLA query head: the non-rotary part plus the rotary part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def head_dim(self) -> int:
        """Head width of the plain multi-head attention path (use_mla=false)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def moe_topk_method(self) -> str:
        return "greedy" if self.topk_method == "gready" else self.topk_method

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


@dataclass
class VisionEncoderConfig(_ConfigBase):
    """The SigLIP ViT (``vision_config``)."""

    SECTION = "vision_config"
    POSITIVE = ("image_size", "patch_size", "width", "layers", "heads")

    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    num_classes: int = 0
    use_checkpoint: bool = False
    weight_init: str = "skip"
    deterministic: bool = False
    num_recomputing_layers: int = 0
    model_type: str = "vision"
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid_size(self) -> int:
        """Patches per side (384 // 14 = 27; the last pixel rows/columns that do not fill a patch are dropped)."""
        return self.image_size // self.patch_size


@dataclass
class MlpProjectorConfig(_ConfigBase):
    """The vision-to-language projector (``projector_config``)."""

    SECTION = "projector_config"
    POSITIVE = ("input_dim", "n_embed", "depth", "downsample_ratio")

    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False
    model_type: str = "mlp_projector"
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.projector_type not in PROJECTOR_TYPES:
            raise ConfigError(
                f"projector_config.projector_type={self.projector_type!r} is not supported; "
                f"use one of {', '.join(PROJECTOR_TYPES)}"
            )
        if self.token_pooling:
            raise ConfigError("projector_config.token_pooling=true is not supported (no official checkpoint uses it)")


@dataclass
class DeepseekVLV2Config:
    """The whole model: vision, projector and language configs plus the tiling layout."""

    vision_config: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    projector_config: MlpProjectorConfig = field(default_factory=MlpProjectorConfig)
    language_config: DeepseekV2Config = field(default_factory=DeepseekV2Config)
    # NOTE(port): the official default is the string "tile_tag" (a bug); every checkpoint sets "2D".
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: List[List[int]] = field(default_factory=lambda: [[384, 384]])
    model_type: str = "deepseek_vl_v2"
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.model_type != "deepseek_vl_v2":
            raise ConfigError(
                f"model_type={self.model_type!r} is not a DeepSeek-VL2 config; expected 'deepseek_vl_v2'"
            )
        if self.tile_tag != "2D":
            raise ConfigError(f"tile_tag={self.tile_tag!r} is not supported; every DeepSeek-VL2 checkpoint uses '2D'")
        if self.global_view_pos not in ("head", "tail"):
            raise ConfigError(f"global_view_pos={self.global_view_pos!r} is not supported; use 'head' or 'tail'")

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "DeepseekVLV2Config":
        data = dict(data)
        subs = {}
        for key, sub_config in (("vision_config", VisionEncoderConfig), ("projector_config", MlpProjectorConfig),
                                ("language_config", DeepseekV2Config)):
            value = data.pop(key, None)
            if value is None:
                raise ConfigError(f"config.json has no {key}; a DeepSeek-VL2 config.json has vision_config, "
                                  "projector_config and language_config: re-download it")
            if not isinstance(value, dict):
                raise ConfigError(f"config.json's {key} must be a JSON object, got {type(value).__name__}; "
                                  "re-download the checkpoint's config.json")
            subs[key] = sub_config.from_dict(value)
        if "model_type" not in data:
            raise ConfigError("config.json has no model_type; a DeepSeek-VL2 config has model_type 'deepseek_vl_v2'")
        known, extra = _split_known(cls, data)
        return cls(**subs, **known, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str) -> "DeepseekVLV2Config":
        """Read ``<path>/config.json`` (or the file ``path`` itself)."""
        return cls.from_dict(read_config_json(path))

    def to_dict(self) -> Dict[str, Any]:
        out = {
            "vision_config": self.vision_config.to_dict(),
            "projector_config": self.projector_config.to_dict(),
            "language_config": self.language_config.to_dict(),
            "tile_tag": self.tile_tag,
            "global_view_pos": self.global_view_pos,
            "candidate_resolutions": self.candidate_resolutions,
            "model_type": self.model_type,
        }
        out.update(self.extra)
        return out

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, ensure_ascii=False)
            f.write("\n")


def read_config_json(path: str) -> Dict[str, Any]:
    """Load a config.json as a dict with a clear error for a missing or broken file."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"{file} not found; --model_path must be a DeepSeek-VL2 checkpoint folder with config.json")
    return read_json_object(file, ConfigError, "re-download the checkpoint's config.json")
