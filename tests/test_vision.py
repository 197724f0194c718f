"""SigLIP tower, projector, tile layout and prepare_inputs_embeds against the goldens and NumPy."""
import json
import math
import os

import numpy as np
import paddle
import pytest
from conftest import CHECKPOINTS, FIXTURES, checkpoint_dir, expected_path
from PIL import Image
from safetensors.numpy import load_file

from paddlemix_vl2.models.deepseek_vl2.checkpoint import load_weights, zero_init
from paddlemix_vl2.models.deepseek_vl2.configuration_deepseek import (
    DeepseekV2Config,
    DeepseekVLV2Config,
    MlpProjectorConfig,
    VisionEncoderConfig,
)
from paddlemix_vl2.models.deepseek_vl2.image_layout import format_image_embeddings
from paddlemix_vl2.models.deepseek_vl2.modeling_deepseek_vl_v2 import DeepseekVLV2ForCausalLM, ImageInputError
from paddlemix_vl2.models.deepseek_vl2.projector import MlpProjector, downsample_patches
from paddlemix_vl2.processors.deepseek_vl2_processing import DeepseekVLV2Processor
from paddlemix_vl2.processors.image_processing import num_image_tokens

ATOL = 2e-5
PIXEL_GOLDEN = os.path.join(FIXTURES, "processor-golden", "vi_multi_turn.pixels.safetensors")
with open(os.path.join(FIXTURES, "expected", "cases.json"), encoding="utf-8") as _f:
    CASES = {case["id"]: case for case in json.load(_f)["cases"]}
IMAGE_CASES = sorted(
    name for name, case in CASES.items() if any(m.get("images") for conv in case["conversations"] for m in conv)
)


# ----------------------------------------------------------------------------------------------
# NumPy references, written from the formulas in tests/fixtures/README.md §9 and the notes §4.3
# ----------------------------------------------------------------------------------------------

def np_gelu_exact(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def np_linear(x, weight, bias):
    """weight in torch orientation [out, in]."""
    return x @ weight.T + bias


def np_downsample(features, ratio):
    """[N, g*g, C] -> [N, g'*g', C*r*r]; element (by, bx) channel c*r*r + dy*r + dx = grid[by*r+dy, bx*r+dx, c]."""
    n, patches, channels = features.shape
    side = math.isqrt(patches)
    blocks = -(-side // ratio)
    grid = np.zeros((n, blocks * ratio, blocks * ratio, channels), features.dtype)
    grid[:, :side, :side] = features.reshape(n, side, side, channels)
    out = np.zeros((n, blocks * blocks, channels * ratio * ratio), features.dtype)
    for by in range(blocks):
        for bx in range(blocks):
            for dy in range(ratio):
                for dx in range(ratio):
                    out[:, by * blocks + bx, np.arange(channels) * ratio * ratio + dy * ratio + dx] = (
                        grid[:, by * ratio + dy, bx * ratio + dx, :]
                    )
    return out


def np_image_tokens(tiles, crop, newline, separator, global_view_pos):
    """tiles [1 + th*tw, s*s, D] -> one image's token list, built token by token."""
    tiles_w, tiles_h = crop
    side = math.isqrt(tiles.shape[1])
    global_rows = []
    for row in range(side):
        global_rows += [tiles[0, row * side + col] for col in range(side)] + [newline]
    local_rows = []
    for row in range(tiles_h * side):
        for col in range(tiles_w * side):
            tile = 1 + (row // side) * tiles_w + col // side
            local_rows.append(tiles[tile, (row % side) * side + col % side])
        local_rows.append(newline)
    if global_view_pos == "head":
        return global_rows + [separator] + local_rows
    return local_rows + [separator] + global_rows


def np_layout(tile_embeds, crops, newline, separator, global_view_pos):
    tokens, start = [], 0
    for sample in crops:
        for tiles_w, tiles_h in sample:
            if tiles_w == 0 or tiles_h == 0:
                break
            count = 1 + tiles_w * tiles_h
            tokens += np_image_tokens(tile_embeds[start:start + count], (tiles_w, tiles_h), newline, separator,
                                      global_view_pos)
            start += count
    return np.stack(tokens) if tokens else np.zeros((0, tile_embeds.shape[-1]), tile_embeds.dtype)


# ----------------------------------------------------------------------------------------------
# Goldens
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    loaded = {}
    for name in CHECKPOINTS:
        ckpt = checkpoint_dir(name)
        with zero_init():
            model = DeepseekVLV2ForCausalLM(DeepseekVLV2Config.from_pretrained(ckpt))
        load_weights(model, ckpt, progress=False)
        model.eval()
        loaded[name] = model
    return loaded


def max_errors(model, golden, batch):
    """Max |error| of tile 0's vision features and projector output, and of inputs_embeds at valid positions."""
    with paddle.no_grad():
        features = model.vision(batch["images"][:1, 0])  # [1, 729, 64]
        projected = model.projector(features)  # [1, 196, 64]
        embeds = model.prepare_inputs_embeds(
            batch["input_ids"], batch["images"], batch["images_seq_mask"], batch["images_spatial_crop"]
        )  # [B, T, 64]
    assert list(features.shape) == [1, 729, 64] and list(projected.shape) == [1, 196, 64]
    valid = golden["attention_mask"]
    return {
        "vision": np.abs(features.numpy()[0] - golden["vision_features_tile0"]).max(),
        "projector": np.abs(projected.numpy()[0] - golden["projector_out_tile0"]).max(),
        "inputs_embeds": np.abs(embeds.numpy()[valid] - golden["inputs_embeds"][valid]).max(),
    }


def process_case(processor, case):
    """The processor calls of tests/fixtures/README.md §4."""
    samples = []
    for conv in case["conversations"]:
        images = [Image.open(os.path.join(FIXTURES, path)).convert("RGB") for m in conv for path in m.get("images", [])]
        samples.append(
            processor.process_one(conversations=conv, images=images, inference_mode=True, system_prompt="")
        )
    return processor.batchify(samples)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_golden_pixels_match(models, name):
    """vi_multi_turn from the stored processor pixels, independent of the processor code."""
    golden = load_file(expected_path(name, "vi_multi_turn"))
    batch = {key: paddle.to_tensor(golden[key]) for key in ("input_ids", "images_seq_mask", "images_spatial_crop")}
    batch["images"] = paddle.to_tensor(load_file(PIXEL_GOLDEN)["images"])
    errors = max_errors(models[name], golden, batch)
    assert all(err <= ATOL for err in errors.values()), f"{name}: {errors}"


@pytest.mark.parametrize("case", IMAGE_CASES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_processed_cases_match(models, name, case):
    golden = load_file(expected_path(name, case))
    batch = process_case(DeepseekVLV2Processor.from_pretrained(checkpoint_dir(name)), CASES[case])
    np.testing.assert_array_equal(batch["input_ids"].numpy(), golden["input_ids"])
    np.testing.assert_array_equal(batch["images_spatial_crop"].numpy(), golden["images_spatial_crop"])
    errors = max_errors(models[name], golden, batch)
    assert all(err <= ATOL for err in errors.values()), f"{name} {case}: {errors}"


def test_no_images_returns_text_embeddings(models):
    model = models["micro-tiny"]
    golden = load_file(expected_path("micro-tiny", "i_text_only"))
    ids = paddle.to_tensor(golden["input_ids"])
    text = model.get_input_embeddings()(ids).numpy()
    with paddle.no_grad():
        without = model.prepare_inputs_embeds(ids)
        zero_crops = model.prepare_inputs_embeds(
            ids,
            paddle.zeros([1, 1, 3, 384, 384]),
            paddle.to_tensor(golden["images_seq_mask"]),
            paddle.to_tensor(golden["images_spatial_crop"]),
        )
    np.testing.assert_array_equal(without.numpy(), text)
    np.testing.assert_array_equal(zero_crops.numpy(), text)
    np.testing.assert_allclose(text, golden["inputs_embeds"][0][None], atol=ATOL, rtol=0)


def test_mask_count_mismatch_is_a_clear_error(models):
    model = models["micro-tiny"]
    golden = load_file(expected_path("micro-tiny", "vi_multi_turn"))
    pixels = load_file(PIXEL_GOLDEN)["images"]
    mask = golden["images_seq_mask"].copy()
    mask[0, np.flatnonzero(mask[0])[0]] = False
    with pytest.raises(ImageInputError, match=r"sample 0: .* 421 image embeddings .* marks 420"):
        model.prepare_inputs_embeds(
            paddle.to_tensor(golden["input_ids"]),
            paddle.to_tensor(pixels),
            paddle.to_tensor(mask),
            paddle.to_tensor(golden["images_spatial_crop"]),
        )


# ----------------------------------------------------------------------------------------------
# Projector against NumPy, every projector_type
# ----------------------------------------------------------------------------------------------

def build_projector(config, seed):
    paddle.seed(seed)
    projector = MlpProjector(config)
    rng = np.random.default_rng(seed)
    weights = {}  # torch orientation, as in the checkpoint and the model
    for name, param in projector.named_parameters():
        value = rng.normal(0, 0.5, param.shape).astype("float32")
        param.set_value(value)
        weights[name] = value
    return projector, weights


def np_projector(config, weights, x):
    kind = config.projector_type
    if kind == "identity":
        return x
    if kind == "linear":
        return np_linear(x, weights["layers.weight"], weights["layers.bias"])
    if kind == "downsample_mlp_gelu":
        x = np_downsample(x, config.downsample_ratio)
    indices = sorted(int(n.split(".")[1]) for n in weights if n.endswith("weight"))
    for position, index in enumerate(indices):
        if position:
            x = np_gelu_exact(x)
        x = np_linear(x, weights[f"layers.{index}.weight"], weights[f"layers.{index}.bias"])
    return x


@pytest.mark.parametrize(
    "config, names",
    [
        (MlpProjectorConfig(projector_type="identity", input_dim=8, n_embed=8), []),
        (MlpProjectorConfig(projector_type="linear", input_dim=8, n_embed=6), ["layers.bias", "layers.weight"]),
        (MlpProjectorConfig(projector_type="mlp_gelu", input_dim=8, n_embed=6, depth=3),
         ["layers.0.bias", "layers.0.weight", "layers.2.bias", "layers.2.weight", "layers.4.bias", "layers.4.weight"]),
        (MlpProjectorConfig(projector_type="downsample_mlp_gelu", input_dim=8, n_embed=6),
         ["layers.0.bias", "layers.0.weight", "layers.2.bias", "layers.2.weight"]),
        (MlpProjectorConfig(projector_type="downsample_mlp_gelu", input_dim=8, n_embed=6, depth=3, mlp_ratio=2),
         ["layers.0.bias", "layers.0.weight", "layers.2.bias", "layers.2.weight", "layers.4.bias", "layers.4.weight"]),
    ],
    ids=["identity", "linear", "mlp_gelu-depth3", "downsample_mlp_gelu", "downsample_mlp_gelu-depth3-ratio2"],
)
@pytest.mark.parametrize("side", [5, 6])
def test_projector_matches_numpy(config, names, side):
    projector, weights = build_projector(config, seed=side)
    assert sorted(weights) == names
    x = np.random.default_rng(side + 10).normal(size=(3, side * side, config.input_dim)).astype("float32")
    with paddle.no_grad():
        out = projector(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(out, np_projector(config, weights, x), atol=1e-5, rtol=1e-5)


def test_downsample_order_is_channel_major():
    """Single non-zero entries land where ``channel*4 + dy*2 + dx`` says (27x27 grid, bottom/right pad)."""
    x = np.arange(729 * 3, dtype="float32").reshape(1, 729, 3) + 1
    out = downsample_patches(paddle.to_tensor(x), 2).numpy()
    assert out.shape == (1, 196, 12)
    np.testing.assert_array_equal(out, np_downsample(x, 2))
    # token (13, 13) covers grid rows/cols 26..27: only (26, 26) is real, the padding is zero
    np.testing.assert_array_equal(out[0, 195], [x[0, 728, c] if k == 0 else 0 for c in range(3) for k in range(4)])


# ----------------------------------------------------------------------------------------------
# Tile layout against a token-by-token NumPy construction
# ----------------------------------------------------------------------------------------------

def random_tiles(count, side, dim, seed):
    return np.random.default_rng(seed).normal(size=(count, side * side, dim)).astype("float32")


@pytest.mark.parametrize("crop", [(1, 1), (2, 1), (1, 3), (3, 3)])
@pytest.mark.parametrize("global_view_pos", ["head", "tail"])
def test_layout_single_image(crop, global_view_pos):
    dim = 4
    tiles = random_tiles(1 + crop[0] * crop[1], 14, dim, seed=crop[0] * 10 + crop[1])
    newline, separator = np.full(dim, 7.0, "float32"), np.full(dim, -7.0, "float32")
    crops = np.array([[crop]])
    out = format_image_embeddings(
        paddle.to_tensor(tiles), crops, paddle.to_tensor(newline), paddle.to_tensor(separator), global_view_pos
    ).numpy()
    assert out.shape == (num_image_tokens(*crop), dim)
    np.testing.assert_array_equal(out, np_layout(tiles, crops, newline, separator, global_view_pos))


def test_layout_batch_with_different_image_counts():
    dim, side = 3, 4
    crops = np.array([
        [[2, 1], [1, 3], [0, 0]],
        [[0, 0], [0, 0], [0, 0]],
        [[3, 3], [0, 0], [2, 2]],  # the (0, 0) ends this sample: the (2, 2) after it is ignored
        [[1, 1], [1, 2], [2, 1]],
    ])
    n_tiles = 3 + 4 + 10 + 2 + 3 + 3
    tiles = random_tiles(n_tiles, side, dim, seed=3)
    newline, separator = np.arange(dim, dtype="float32") + 100, np.arange(dim, dtype="float32") - 100
    out = format_image_embeddings(
        paddle.to_tensor(tiles), paddle.to_tensor(crops), paddle.to_tensor(newline), paddle.to_tensor(separator)
    ).numpy()
    expected_count = sum(
        num_image_tokens(w, h, image_size=side * 14, patch_size=14, downsample_ratio=1)
        for w, h in [(2, 1), (1, 3), (3, 3), (1, 1), (1, 2), (2, 1)]
    )
    assert out.shape == (expected_count, dim)
    np.testing.assert_array_equal(out, np_layout(tiles, crops, newline, separator, "head"))


def test_layout_rejects_wrong_tile_count():
    tiles = paddle.zeros([3, 196, 4])
    with pytest.raises(ValueError, match="describes 5 tiles but 3 tile embeddings"):
        format_image_embeddings(tiles, np.array([[[2, 2]]]), paddle.zeros([4]), paddle.zeros([4]))


def test_num_image_tokens_formula():
    counts = {(1, 1): 421, (2, 1): 617, (1, 2): 631, (2, 2): 1023, (3, 3): 2017, (9, 1): 1989, (1, 9): 2101}
    assert {crop: num_image_tokens(*crop) for crop in counts} == counts


# ----------------------------------------------------------------------------------------------
# prepare_inputs_embeds on a batch with uneven images, against an independent merge
# ----------------------------------------------------------------------------------------------

def small_model():
    config = DeepseekVLV2Config(
        vision_config=VisionEncoderConfig(image_size=56, patch_size=14, width=16, layers=1, heads=2),
        projector_config=MlpProjectorConfig(input_dim=16, n_embed=8),
        language_config=DeepseekV2Config(
            vocab_size=32, hidden_size=8, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, use_mla=False, kv_lora_rank=None, q_lora_rank=None,
            topk_method="greedy",
        ),
    )
    paddle.seed(0)
    model = DeepseekVLV2ForCausalLM(config)
    model.eval()
    return model


def test_prepare_inputs_embeds_batch_matches_independent_merge():
    model = small_model()
    side = 2  # 56 px / 14 = 4 patches per side, downsampled by 2
    crops = np.array([[[2, 1], [1, 1]], [[0, 0], [0, 0]], [[1, 2], [0, 0]]])
    tiles_used = [3 + 2, 0, 3]
    max_tiles, seq_len = 6, 60
    rng = np.random.default_rng(1)
    images = np.zeros((3, max_tiles, 3, 56, 56), "float32")
    for b, count in enumerate(tiles_used):
        images[b, :count] = rng.uniform(-1, 1, (count, 3, 56, 56))
    counts = [
        sum(num_image_tokens(w, h, 56, 14, 2) for w, h in sample if w and h) for sample in crops
    ]
    mask = np.zeros((3, seq_len), bool)
    mask[0, 2:2 + counts[0]] = True
    mask[2, seq_len - counts[2] - 1:-1] = True
    input_ids = rng.integers(0, 32, (3, seq_len))
    with paddle.no_grad():
        out = model.prepare_inputs_embeds(
            paddle.to_tensor(input_ids), paddle.to_tensor(images), paddle.to_tensor(mask), paddle.to_tensor(crops)
        ).numpy()
        table = model.get_input_embeddings().weight.numpy()
        per_tile = [
            model.encode_tiles(paddle.to_tensor(images[b, t:t + 1])).numpy()[0]
            for b, count in enumerate(tiles_used) for t in range(count)
        ]
    assert per_tile[0].shape == (side * side, 8)
    tokens = np_layout(np.stack(per_tile), crops, model.image_newline.numpy(), model.view_seperator.numpy(), "head")
    expected = table[input_ids]
    expected[mask] = tokens
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)


def test_prepare_inputs_embeds_is_differentiable():
    """Training needs gradients through the merge: d(sum(out * R)) / d(image_newline) = sum of R at newlines."""
    model = small_model()
    crops = np.array([[[2, 1]], [[1, 1]]])
    seq_len = 70
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (2, 3, 3, 56, 56)).astype("float32")
    images[1, 2:] = 0.0
    mask = np.zeros((2, seq_len), bool)
    mask[0, 5:5 + num_image_tokens(2, 1, 56, 14, 2)] = True
    mask[1, -num_image_tokens(1, 1, 56, 14, 2):] = True
    weights = rng.normal(size=(2, seq_len, 8)).astype("float32")
    out = model.prepare_inputs_embeds(
        paddle.to_tensor(rng.integers(0, 32, (2, seq_len))), paddle.to_tensor(images), paddle.to_tensor(mask),
        paddle.to_tensor(crops),
    )
    (out * paddle.to_tensor(weights)).sum().backward()
    # Mark which image tokens are newlines with a layout of sentinel values.
    sentinel_tiles = np.zeros((5, 4, 1), "float32")
    is_newline = np_layout(sentinel_tiles, crops, np.ones(1, "float32"), np.zeros(1, "float32"), "head")[:, 0] == 1
    newline_positions = np.zeros((2, seq_len), bool)
    newline_positions[mask] = is_newline
    np.testing.assert_allclose(model.image_newline.grad.numpy(), weights[newline_positions].sum(0), rtol=1e-5, atol=1e-5)
    assert model.vision.blocks[0].attn.qkv.weight.grad is not None
    assert float(model.projector.layers[0].weight.grad.abs().sum()) > 0
