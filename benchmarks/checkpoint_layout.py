"""Tensor names and shapes of a DeepSeek-VL2 checkpoint, derived from its (sparse) config.json.

``official_config`` gives the config.json of the released checkpoints (tiny, small, full) and of the micro
test size; ``ModelSpec.from_config`` reads any such config with the official defaults filled in;
``tensor_specs`` lists every tensor of the official state_dict (torch Linear weights ``[out, in]``, including
the unused ``vision.attn_pool.*``); ``parameter_count`` sums them without allocating anything.
Sources: the project's notes on the official implementation (config defaults and tensor shapes) and the official
configuration_deepseek.py / modeling_deepseek_vl_v2.py / siglip_vit.py.
"""

from __future__ import annotations

import dataclasses
import enum
import copy
import math

BF16_BYTES = 2

CANDIDATE_RESOLUTIONS = (
    (384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384), (768, 768),
    (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768), (384, 2688), (2688, 384),
    (384, 3072), (3072, 384), (768, 1536), (1536, 768), (384, 3456), (3456, 384), (1152, 1152),
)

# The official vision_config block, identical in the three released checkpoints.
SIGLIP_SO400M_VISION_CONFIG = {
    "layers": 27, "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384", "model_type": "vision",
    "patch_size": 14, "width": 1152,
}

TINY_LANGUAGE_CONFIG = {
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_size": 1280,
    "intermediate_size": 6848, "kv_lora_rank": None, "lm_head": True, "max_position_embeddings": 4096,
    "model_type": "deepseek_v2", "moe_intermediate_size": 896, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_attention_heads": 10, "num_experts_per_tok": 6, "num_hidden_layers": 12,
    "num_key_value_heads": 10, "q_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0,
    "rm_head": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "use_mla": False,
    "v_head_dim": 0, "vocab_size": 129280,
}

SMALL_LANGUAGE_CONFIG = {
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_size": 2048,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 4096,
    "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "v_head_dim": 128,
    "vocab_size": 102400,
}

# Verbatim from the official deepseek-vl2 file: layers (30), heads (32) and the MLA sizes are absent and
# come from the DeepseekV2Config defaults.
FULL_LANGUAGE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV2Config",
        "AutoModel": "modeling_deepseek.DeepseekV2Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
    },
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_size": 2560,
    "intermediate_size": 12288, "lm_head": False, "max_position_embeddings": 4096,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1536, "n_group": 1, "n_routed_experts": 72, "n_shared_experts": 2,
    "norm_topk_prob": True, "num_experts_per_tok": 6, "q_lora_rank": None, "rm_head": False,
    "routed_scaling_factor": 2.0, "scoring_func": "sigmoid", "topk_group": 1, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "vocab_size": 129280,
}

# The sizes of the micro-tiny test fixture: a tiny-like MHA model that writes in well under a second.
MICRO_LANGUAGE_CONFIG = {
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_size": 64,
    "intermediate_size": 192, "kv_lora_rank": None, "lm_head": True, "max_position_embeddings": 4096,
    "model_type": "deepseek_v2", "moe_intermediate_size": 32, "n_group": 1, "n_routed_experts": 16,
    "n_shared_experts": 2, "num_attention_heads": 4, "num_experts_per_tok": 4, "num_hidden_layers": 3,
    "num_key_value_heads": 4, "q_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0,
    "rm_head": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "use_mla": False,
    "v_head_dim": 0, "vocab_size": 1024,
}
MICRO_VISION_CONFIG = {**SIGLIP_SO400M_VISION_CONFIG, "heads": 4, "layers": 2, "width": 64}

ARCHITECTURES = ("micro", "tiny", "small", "full")

# DeepseekV2Config defaults for the keys that decide tensor shapes (configuration_deepseek.py).
LANGUAGE_DEFAULTS = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
    "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": None,
    "n_shared_experts": None, "n_routed_experts": None, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "gready",
    "moe_layer_freq": 1, "first_k_dense_replace": 0, "use_mla": True, "attention_bias": False,
    "tie_word_embeddings": False,
}
VISION_DEFAULTS = {"image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "mlp_ratio": 4}
PROJECTOR_DEFAULTS = {
    "projector_type": "downsample_mlp_gelu", "input_dim": 1152, "n_embed": 2048, "depth": 2, "mlp_ratio": 1,
    "downsample_ratio": 2, "token_pooling": False,
}


class CheckpointConfigError(ValueError):
    """A config asks for a layout this writer does not produce."""


class Init(enum.Enum):
    """How a tensor is filled."""

    NORMAL = "normal"
    ONES = "ones"
    ZEROS = "zeros"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its state_dict name, torch shape and fill."""

    name: str
    shape: tuple[int, ...]
    init: Init

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * BF16_BYTES


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """SigLIP ViT sizes. mlp_hidden = int(width * mlp_ratio), as timm computes it."""

    width: int
    layers: int
    mlp_ratio: float
    patch_size: int
    image_size: int

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class ProjectorSpec:
    """downsample_mlp_gelu projector sizes."""

    input_dim: int
    n_embed: int
    depth: int
    mlp_ratio: int
    downsample_ratio: int


@dataclasses.dataclass(frozen=True)
class LanguageSpec:
    """The DeepseekV2 sizes that decide tensor shapes, with config defaults already applied."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    n_routed_experts: int | None
    n_shared_experts: int | None
    first_k_dense_replace: int
    moe_layer_freq: int
    use_mla: bool
    q_lora_rank: int | None
    kv_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    topk_method: str
    attention_bias: bool

    def is_moe_layer(self, layer_index: int) -> bool:
        """Same rule as DeepseekV2DecoderLayer."""
        return (
            self.n_routed_experts is not None
            and layer_index >= self.first_k_dense_replace
            and layer_index % self.moe_layer_freq == 0
        )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that decides the checkpoint's tensor names and shapes."""

    vision: VisionSpec
    projector: ProjectorSpec
    language: LanguageSpec

    @classmethod
    def from_config(cls, config: dict) -> ModelSpec:
        """Read a (sparse) DeepSeek-VL2 config.json dict, filling absent keys with the official defaults."""
        if config.get("tile_tag") != "2D":
            raise CheckpointConfigError(
                f"tile_tag {config.get('tile_tag')!r} is not supported; the released checkpoints use \"2D\""
            )
        vision = {**VISION_DEFAULTS, **config.get("vision_config", {})}
        projector = {**PROJECTOR_DEFAULTS, **config.get("projector_config", {})}
        language = {**LANGUAGE_DEFAULTS, **config.get("language_config", {})}
        if projector["projector_type"] != "downsample_mlp_gelu" or projector["token_pooling"]:
            raise CheckpointConfigError(
                "only projector_type downsample_mlp_gelu without token_pooling is supported "
                "(the released checkpoints); fix projector_config"
            )
        if language["tie_word_embeddings"]:
            raise CheckpointConfigError("tie_word_embeddings true is not supported; set it to false")
        if not language["use_mla"] and language["hidden_size"] % language["num_attention_heads"]:
            raise CheckpointConfigError(
                "MHA needs hidden_size divisible by num_attention_heads; fix language_config"
            )
        num_key_value_heads = language["num_key_value_heads"]
        if num_key_value_heads is None:
            num_key_value_heads = language["num_attention_heads"]
        return cls(
            vision=VisionSpec(
                width=vision["width"], layers=vision["layers"], mlp_ratio=vision["mlp_ratio"],
                patch_size=vision["patch_size"], image_size=vision["image_size"],
            ),
            projector=ProjectorSpec(
                input_dim=projector["input_dim"], n_embed=projector["n_embed"], depth=projector["depth"],
                mlp_ratio=projector["mlp_ratio"], downsample_ratio=projector["downsample_ratio"],
            ),
            language=LanguageSpec(
                vocab_size=language["vocab_size"], hidden_size=language["hidden_size"],
                intermediate_size=language["intermediate_size"],
                moe_intermediate_size=language["moe_intermediate_size"],
                num_hidden_layers=language["num_hidden_layers"],
                num_attention_heads=language["num_attention_heads"], num_key_value_heads=num_key_value_heads,
                n_routed_experts=language["n_routed_experts"], n_shared_experts=language["n_shared_experts"],
                first_k_dense_replace=language["first_k_dense_replace"],
                moe_layer_freq=language["moe_layer_freq"], use_mla=language["use_mla"],
                q_lora_rank=language["q_lora_rank"], kv_lora_rank=language["kv_lora_rank"],
                qk_nope_head_dim=language["qk_nope_head_dim"], qk_rope_head_dim=language["qk_rope_head_dim"],
                v_head_dim=language["v_head_dim"], topk_method=language["topk_method"],
                attention_bias=language["attention_bias"],
            ),
        )


def official_config(arch: str, num_layers: int | None = None) -> dict:
    """The sparse config.json of a released checkpoint (or the micro test size), optionally with fewer layers.

    ``num_layers`` overrides ``language_config.num_hidden_layers``; for ``full`` the key is added, since the
    official file leaves it at the default of 30.
    """
    if arch not in ARCHITECTURES:
        raise CheckpointConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if num_layers is not None and num_layers < 1:
        raise CheckpointConfigError(f"--layers must be at least 1, got {num_layers}")
    language_by_arch = {
        "micro": MICRO_LANGUAGE_CONFIG, "tiny": TINY_LANGUAGE_CONFIG,
        "small": SMALL_LANGUAGE_CONFIG, "full": FULL_LANGUAGE_CONFIG,
    }
    language_config = copy.deepcopy(language_by_arch[arch])
    if num_layers is not None:
        language_config["num_hidden_layers"] = num_layers
    projector_config = {"model_type": "mlp_projector", "n_embed": language_config["hidden_size"]}
    if arch == "micro":
        projector_config["input_dim"] = MICRO_VISION_CONFIG["width"]
    return {
        "candidate_resolutions": [list(resolution) for resolution in CANDIDATE_RESOLUTIONS],
        "global_view_pos": "head",
        "language_config": language_config,
        "model_type": "deepseek_vl_v2",
        "projector_config": projector_config,
        "tile_tag": "2D",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.2",
        "vision_config": dict(MICRO_VISION_CONFIG if arch == "micro" else SIGLIP_SO400M_VISION_CONFIG),
    }


def _linear(prefix: str, out_features: int, in_features: int, bias: bool) -> list[TensorSpec]:
    tensors = [TensorSpec(f"{prefix}.weight", (out_features, in_features), Init.NORMAL)]
    if bias:
        tensors.append(TensorSpec(f"{prefix}.bias", (out_features,), Init.ZEROS))
    return tensors


def _layer_norm(prefix: str, size: int) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.weight", (size,), Init.ONES),
        TensorSpec(f"{prefix}.bias", (size,), Init.ZEROS),
    ]


def _rms_norm(prefix: str, size: int) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.weight", (size,), Init.ONES)]


def _gated_mlp(prefix: str, hidden: int, intermediate: int) -> list[TensorSpec]:
    return [
        *_linear(f"{prefix}.gate_proj", intermediate, hidden, bias=False),
        *_linear(f"{prefix}.up_proj", intermediate, hidden, bias=False),
        *_linear(f"{prefix}.down_proj", hidden, intermediate, bias=False),
    ]


def _vision_tensors(vision: VisionSpec) -> list[TensorSpec]:
    width, hidden, patch = vision.width, vision.mlp_hidden, vision.patch_size
    tensors = [
        TensorSpec("vision.pos_embed", (1, vision.num_patches, width), Init.NORMAL),
        TensorSpec("vision.patch_embed.proj.weight", (width, 3, patch, patch), Init.NORMAL),
        TensorSpec("vision.patch_embed.proj.bias", (width,), Init.ZEROS),
    ]
    for block in range(vision.layers):
        prefix = f"vision.blocks.{block}"
        tensors += [
            *_layer_norm(f"{prefix}.norm1", width),
            *_linear(f"{prefix}.attn.qkv", 3 * width, width, bias=True),
            *_linear(f"{prefix}.attn.proj", width, width, bias=True),
            *_layer_norm(f"{prefix}.norm2", width),
            *_linear(f"{prefix}.mlp.fc1", hidden, width, bias=True),
            *_linear(f"{prefix}.mlp.fc2", width, hidden, bias=True),
        ]
    tensors += _layer_norm("vision.norm", width)
    # timm AttentionPoolLatent: built although ignore_head=True never calls it, so it is in the checkpoint.
    tensors += [
        TensorSpec("vision.attn_pool.latent", (1, 1, width), Init.NORMAL),
        *_linear("vision.attn_pool.q", width, width, bias=True),
        *_linear("vision.attn_pool.kv", 2 * width, width, bias=True),
        *_linear("vision.attn_pool.proj", width, width, bias=True),
        *_layer_norm("vision.attn_pool.norm", width),
        *_linear("vision.attn_pool.mlp.fc1", hidden, width, bias=True),
        *_linear("vision.attn_pool.mlp.fc2", width, hidden, bias=True),
    ]
    return tensors


def _projector_tensors(projector: ProjectorSpec) -> list[TensorSpec]:
    """nn.Sequential of Linear/GELU pairs: the Linears sit at even indices 0, 2, 4, ..."""
    width = projector.n_embed * projector.mlp_ratio
    in_features = projector.input_dim * projector.downsample_ratio ** 2
    tensors = _linear("projector.layers.0", width, in_features, bias=True)
    for index in range(1, projector.depth - 1):
        tensors += _linear(f"projector.layers.{2 * index}", width, width, bias=True)
    tensors += _linear(f"projector.layers.{2 * (projector.depth - 1)}", projector.n_embed, width, bias=True)
    return tensors


def _attention_tensors(prefix: str, language: LanguageSpec) -> list[TensorSpec]:
    hidden, heads, bias = language.hidden_size, language.num_attention_heads, language.attention_bias
    if not language.use_mla:
        head_dim = hidden // heads
        kv_width = language.num_key_value_heads * head_dim
        return [
            *_linear(f"{prefix}.q_proj", heads * head_dim, hidden, bias),
            *_linear(f"{prefix}.k_proj", kv_width, hidden, bias),
            *_linear(f"{prefix}.v_proj", kv_width, hidden, bias),
            *_linear(f"{prefix}.o_proj", hidden, heads * head_dim, bias),
        ]
    q_head_dim = language.qk_nope_head_dim + language.qk_rope_head_dim
    if language.q_lora_rank is None:
        tensors = _linear(f"{prefix}.q_proj", heads * q_head_dim, hidden, bias=False)
    else:
        tensors = [
            *_linear(f"{prefix}.q_a_proj", language.q_lora_rank, hidden, bias),
            *_rms_norm(f"{prefix}.q_a_layernorm", language.q_lora_rank),
            *_linear(f"{prefix}.q_b_proj", heads * q_head_dim, language.q_lora_rank, bias=False),
        ]
    kv_rank = language.kv_lora_rank
    kv_b_width = heads * (language.qk_nope_head_dim + language.v_head_dim)
    return tensors + [
        *_linear(f"{prefix}.kv_a_proj_with_mqa", kv_rank + language.qk_rope_head_dim, hidden, bias),
        *_rms_norm(f"{prefix}.kv_a_layernorm", kv_rank),
        *_linear(f"{prefix}.kv_b_proj", kv_b_width, kv_rank, bias=False),
        *_linear(f"{prefix}.o_proj", hidden, heads * language.v_head_dim, bias),
    ]


def _moe_tensors(prefix: str, language: LanguageSpec) -> list[TensorSpec]:
    hidden, experts = language.hidden_size, language.n_routed_experts
    tensors = []
    for expert in range(experts):
        tensors += _gated_mlp(f"{prefix}.experts.{expert}", hidden, language.moe_intermediate_size)
    tensors.append(TensorSpec(f"{prefix}.gate.weight", (experts, hidden), Init.NORMAL))
    if language.topk_method == "noaux_tc":
        tensors.append(TensorSpec(f"{prefix}.gate.e_score_correction_bias", (experts,), Init.ZEROS))
    if language.n_shared_experts is not None:
        shared_width = language.moe_intermediate_size * language.n_shared_experts
        tensors += _gated_mlp(f"{prefix}.shared_experts", hidden, shared_width)
    return tensors


def _language_tensors(language: LanguageSpec) -> list[TensorSpec]:
    hidden = language.hidden_size
    tensors = [TensorSpec("language.model.embed_tokens.weight", (language.vocab_size, hidden), Init.NORMAL)]
    for layer in range(language.num_hidden_layers):
        prefix = f"language.model.layers.{layer}"
        tensors += _attention_tensors(f"{prefix}.self_attn", language)
        if language.is_moe_layer(layer):
            tensors += _moe_tensors(f"{prefix}.mlp", language)
        else:
            tensors += _gated_mlp(f"{prefix}.mlp", hidden, language.intermediate_size)
        tensors += _rms_norm(f"{prefix}.input_layernorm", hidden)
        tensors += _rms_norm(f"{prefix}.post_attention_layernorm", hidden)
    tensors += _rms_norm("language.model.norm", hidden)
    tensors.append(TensorSpec("language.lm_head.weight", (language.vocab_size, hidden), Init.NORMAL))
    return tensors


def tensor_specs(spec: ModelSpec) -> list[TensorSpec]:
    """All checkpoint tensors in torch state_dict order (a module's own parameters before its children)."""
    n_embed = spec.projector.n_embed
    return [
        TensorSpec("image_newline", (n_embed,), Init.NORMAL),
        TensorSpec("view_seperator", (n_embed,), Init.NORMAL),
        *_vision_tensors(spec.vision),
        *_projector_tensors(spec.projector),
        *_language_tensors(spec.language),
    ]


def parameter_count(spec: ModelSpec) -> int:
    """Number of parameters in the checkpoint (every tensor, including the unused attn_pool)."""
    return sum(tensor.numel for tensor in tensor_specs(spec))
