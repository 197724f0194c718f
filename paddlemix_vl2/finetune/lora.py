"""LoRA adapters for DeepSeek-VL2: wrap Linear layers chosen by name, merge them back, save and load them.

A wrapped layer computes ``x @ W.T + b + dropout(x) @ A @ B * (alpha / r)`` with the base weight ``W``
[out, in] frozen, ``A`` [in, r] Kaiming-uniform and ``B`` [r, out] zero, so a fresh adapter changes
nothing. The wrapper keeps the base ``weight``/``bias`` parameters under their own names, so the model's
state names stay those of the official checkpoint and the adapters are ``<module>.lora_A``/``.lora_B``.

On disk an adapter folder holds ``lora_config.json`` and ``peft_model.safetensors`` (plus its one-shard
index), the names and orientation PaddleNLP's ``LoRAModel.from_pretrained`` reads. Nothing is pickled.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Dict, List, Optional

import paddle
import paddle.nn.functional as F
from paddle import nn

from ..json_files import read_json_object
from ..models.deepseek_vl2.layers import Linear
from .files import atomic_directory, load_named_tensors, save_named_tensors

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "LoRAConfig",
    "LoRAError",
    "LoRALinear",
    "apply_lora",
    "lora_layers",
    "merge_lora",
    "adapter_state_dict",
    "write_adapter_files",
    "save_adapters",
    "read_adapter_config",
    "load_adapters",
]

ADAPTER_CONFIG_FILE = "lora_config.json"
ADAPTER_WEIGHTS_FILE = "peft_model.safetensors"
_ADAPTER_INDEX_FILE = "peft_model.safetensors.index.json"

# Full-match regexes over module names: the language model's attention projections, its dense MLP, the
# shared experts and every routed expert. (PaddleMIX's globs such as
# ``language.model.layers.*.self_attn.q_proj.*`` are valid regexes with the same meaning.)
DEFAULT_TARGET_MODULES = (
    r"language\.model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa)",
    r"language\.model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
    r"language\.model\.layers\.\d+\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)",
    r"language\.model\.layers\.\d+\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)",
)
# Absorbed MLA attention reads kv_b_proj.weight directly instead of calling the layer, so an adapter
# there would be silently ignored.
_WEIGHT_READ_DIRECTLY = re.compile(r"(^|\.)kv_b_proj$")


class LoRAError(ValueError):
    """A LoRA configuration or adapter folder that cannot be used; the message says what to change."""


@dataclasses.dataclass
class LoRAConfig:
    """Adapter settings; field names are those of PaddleNLP's ``lora_config.json``."""

    r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: List[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    base_model_name_or_path: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise LoRAError(f"LoRA rank must be a positive integer, got {self.r!r}; set --lora_rank")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LoRAError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        for pattern in self.target_modules:
            try:
                re.compile(pattern)
            except re.error as err:
                raise LoRAError(
                    f"target module pattern {pattern!r} is not a valid regular expression ({err})"
                ) from None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict) -> "LoRAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class LoRALinear(nn.Layer):
    """A Linear layer plus a low-rank update; ``weight`` [out, in] and ``bias`` are the base parameters."""

    def __init__(self, base: Linear, config: LoRAConfig):
        super().__init__()
        out_features, in_features = base.weight.shape
        self.weight = base.weight
        self.bias = base.bias
        # A bf16-stored base weight (float32 CPU inference) computes in float32, and so do its adapters.
        stored_only = base.weight.dtype == paddle.bfloat16 and base.weight.place.is_cpu_place()
        dtype = paddle.float32 if stored_only else base.weight.dtype
        # Kaiming-uniform with a = sqrt(5) over fan_in = in_features, as PEFT and PaddleNLP initialise A.
        bound = 1.0 / math.sqrt(in_features)
        self.lora_A = self.create_parameter(
            [in_features, config.r], dtype=dtype, default_initializer=nn.initializer.Uniform(-bound, bound)
        )
        self.lora_B = self.create_parameter(
            [config.r, out_features], dtype=dtype, default_initializer=nn.initializer.Constant(0.0)
        )
        self.scaling = config.scaling
        self.dropout = config.lora_dropout
        # The original layer, kept unregistered so its parameters are not listed twice; merge_lora puts it back.
        object.__setattr__(self, "_base_layer", base)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """x [..., in] -> [..., out]."""
        out = self._base_layer(x)
        h = F.dropout(x, p=self.dropout, training=self.training) if self.dropout > 0 else x
        return out + paddle.matmul(paddle.matmul(h, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> paddle.Tensor:
        """The update ``(A @ B).T * scaling`` [out, in] that merging adds to ``weight``."""
        return paddle.matmul(self.lora_B, self.lora_A, transpose_x=True, transpose_y=True) * self.scaling

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in={in_features}, out={out_features}, r={self.lora_A.shape[1]}, scaling={self.scaling:g}"


def _replace(model: nn.Layer, name: str, layer: nn.Layer) -> None:
    """Put ``layer`` where the sublayer ``name`` is (also inside LayerList/Sequential, whose keys are "0", "1", ...)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model
    for part in parent_name.split(".") if parent_name else ():
        parent = getattr(parent, part)
    setattr(parent, attr, layer)


def lora_layers(model: nn.Layer) -> Dict[str, LoRALinear]:
    """The model's LoRA-wrapped layers by module name."""
    return {name: layer for name, layer in model.named_sublayers() if isinstance(layer, LoRALinear)}


def apply_lora(model: nn.Layer, config: LoRAConfig) -> List[str]:
    """Wrap every ``Linear`` whose module name fully matches one of ``config.target_modules``.

    Every base parameter is frozen (``stop_gradient``); only the new ``lora_A``/``lora_B`` train.
    Returns the wrapped module names; raises LoRAError when nothing matches or a match cannot take LoRA.
    """
    patterns = [re.compile(p) for p in config.target_modules]
    targets = [
        name
        for name, layer in model.named_sublayers()
        if isinstance(layer, Linear) and any(p.fullmatch(name) for p in patterns)
    ]
    if not targets:
        raise LoRAError(
            f"no Linear layer matches --lora_target_modules {config.target_modules}; module names look like "
            "language.model.layers.0.self_attn.q_proj (patterns are full-match regular expressions)"
        )
    refused = [name for name in targets if _WEIGHT_READ_DIRECTLY.search(name)]
    if refused:
        raise LoRAError(
            f"{refused[0]} cannot take LoRA: MLA attention uses its weight directly, so the adapter would be "
            "ignored; leave kv_b_proj out of --lora_target_modules"
        )
    for param in model.parameters():
        param.stop_gradient = True
    modules = dict(model.named_sublayers())
    for name in targets:
        _replace(model, name, LoRALinear(modules[name], config))
    return targets


def merge_lora(model: nn.Layer) -> nn.Layer:
    """Add each adapter's update into its base weight and put the plain Linear layers back (in place).

    The result has exactly the official parameter names, so ``save_pretrained`` writes an official
    checkpoint. Returns ``model``.
    """
    for name, layer in lora_layers(model).items():
        with paddle.no_grad():
            merged = layer.weight.astype(paddle.float32) + layer.delta_weight().astype(paddle.float32)
            if layer.weight.dtype == layer.lora_A.dtype:
                layer.weight.set_value(merged.astype(layer.weight.dtype))
            else:  # a bf16-stored base: keep the merged weight at the adapters' precision
                layer._base_layer.weight = paddle.create_parameter(
                    merged.shape, layer.lora_A.dtype, default_initializer=nn.initializer.Assign(merged)
                )
        _replace(model, name, layer._base_layer)
    return model


def adapter_state_dict(model: nn.Layer) -> Dict[str, paddle.Tensor]:
    """``{"<module>.lora_A": [in, r], "<module>.lora_B": [r, out]}`` for every LoRA layer."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A
        state[f"{name}.lora_B"] = layer.lora_B
    return state


def write_adapter_files(model: nn.Layer, config: LoRAConfig, directory: str) -> None:
    """Write the adapter files into an existing folder (no atomicity; see ``save_adapters``)."""
    tensors = adapter_state_dict(model)
    if not tensors:
        raise LoRAError("the model has no LoRA layers to save; call apply_lora first")
    save_named_tensors(tensors, os.path.join(directory, ADAPTER_WEIGHTS_FILE))
    total = sum(int(t.numel()) * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {name: ADAPTER_WEIGHTS_FILE for name in sorted(tensors)}}
    with open(os.path.join(directory, _ADAPTER_INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(directory, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=2)


def save_adapters(model: nn.Layer, config: LoRAConfig, directory: str) -> None:
    """Save the adapters alone (safetensors + ``lora_config.json``); the folder appears complete or not at all."""
    with atomic_directory(directory) as staging:
        write_adapter_files(model, config, staging)


def read_adapter_config(directory: str) -> LoRAConfig:
    """The ``LoRAConfig`` of an adapter folder."""
    path = os.path.join(directory, ADAPTER_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found; --lora_path must be a folder written by save_adapters or a LoRA checkpoint"
        )
    return LoRAConfig.from_dict(read_json_object(path, LoRAError, "save the adapters again"))


def load_adapters(model: nn.Layer, directory: str, config: Optional[LoRAConfig] = None) -> LoRAConfig:
    """Wrap ``model`` as the adapter folder says (unless already wrapped) and load its adapter weights.

    Missing or unexpected adapter names, or shape mismatches, raise one ``StateFileError`` naming them.
    Returns the folder's config.
    """
    config = config or read_adapter_config(directory)
    if not lora_layers(model):
        apply_lora(model, config)
    load_named_tensors(adapter_state_dict(model), os.path.join(directory, ADAPTER_WEIGHTS_FILE), what="adapter")
    return config

