"""DeepseekVLV2Processor against the official goldens, plus tiling rules, token counts and input errors.

Goldens: ``fixtures/processor-golden/*.json`` (real vocabulary), ``fixtures/expected/<ckpt>/<case>.safetensors``
(micro tokenizers) and ``fixtures/expected/train`` (training labels). See fixtures/README.md §4, §5, §7, §8.
"""
import dataclasses
import functools
import glob
import json
import math
import os
import struct
import zlib

import numpy as np
import paddle
import pytest
from conftest import CHECKPOINTS, FIXTURES, checkpoint_dir, expected_path
from PIL import Image
from safetensors.numpy import load_file

from paddlemix_vl2.processors import (
    DeepseekTokenizer,
    DeepseekVLV2Processor,
    DeepseekVLV2ProcessorConfig,
    ImageLoadError,
    ProcessorConfigError,
    ProcessorInputError,
    UnknownTemplateError,
    downsampled_grid_size,
    get_conv_template,
    num_image_tokens,
    select_best_resolution,
)

PROCESSOR_GOLDEN_DIR = os.path.join(FIXTURES, "processor-golden")
GOLDEN_CASES = sorted(os.path.basename(p)[: -len(".json")] for p in glob.glob(f"{PROCESSOR_GOLDEN_DIR}/*.json"))
with open(os.path.join(FIXTURES, "expected", "cases.json"), encoding="utf-8") as _handle:
    MODEL_CASES = {case["id"]: case["conversations"] for case in json.load(_handle)["cases"]}
PROCESSOR_CONFIG = os.path.join(checkpoint_dir("micro-tiny"), "processor_config.json")
IMAGE = {name: os.path.join(FIXTURES, "images", name) for name in ("scene_640x480.png", "small_200x150.png")}
ASSISTANT = "<|Assistant|>"


@functools.lru_cache(maxsize=None)
def real_vocab_processor(**overrides) -> DeepseekVLV2Processor:
    """The official processor_config with the real VL2 vocabulary (what processor-golden was made with)."""
    config = dataclasses.replace(DeepseekVLV2ProcessorConfig.from_file(PROCESSOR_CONFIG), **overrides)
    return DeepseekVLV2Processor(DeepseekTokenizer.from_pretrained(os.path.join(FIXTURES, "tokenizer-vl2")), config)


@functools.lru_cache(maxsize=None)
def micro_processor(checkpoint: str, **overrides) -> DeepseekVLV2Processor:
    return DeepseekVLV2Processor.from_pretrained(checkpoint_dir(checkpoint), **overrides)


def image_paths(conversation):
    return [os.path.join(FIXTURES, path) for message in conversation for path in message.get("images", [])]


def run_case(processor, conversations):
    """The official call of fixtures/README.md §4: one conversation via __call__, several via batchify."""
    if len(conversations) == 1:
        return processor(conversations=conversations[0], images=image_paths(conversations[0]))
    return processor.batchify([processor.process_one(conversations=c, images=image_paths(c)) for c in conversations])


def one_image_turn(content="<image>\nDescribe this image."):
    return [{"role": "<|User|>", "content": content}, {"role": ASSISTANT, "content": ""}]


# ----------------------------------------------------------------------------------------------- goldens


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_processor_golden(case):
    with open(os.path.join(PROCESSOR_GOLDEN_DIR, f"{case}.json"), encoding="utf-8") as handle:
        golden = json.load(handle)
    out = run_case(real_vocab_processor(), golden["case"]["conversations"])

    assert out.input_ids.dtype == paddle.int64 and out.labels.dtype == paddle.int64
    assert out.attention_mask.dtype == paddle.bool and out.images_seq_mask.dtype == paddle.bool
    assert out.images.dtype == paddle.float32 and out.images_spatial_crop.dtype == paddle.int64
    np.testing.assert_array_equal(out.input_ids.numpy(), golden["input_ids"])
    np.testing.assert_array_equal(out.attention_mask.numpy(), np.asarray(golden["attention_mask"], dtype=bool))
    np.testing.assert_array_equal(out.images_seq_mask.numpy(), np.asarray(golden["images_seq_mask"], dtype=bool))
    np.testing.assert_array_equal(out.labels.numpy(), golden["labels"])
    np.testing.assert_array_equal(out.images_spatial_crop.numpy(), golden["images_spatial_crop"])
    assert list(out.images.shape) == golden["images_shape"]
    pixels = out.images.numpy().astype(np.float64)
    np.testing.assert_allclose(pixels.sum(axis=(2, 3, 4)), golden["tile_pixel_sums"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(pixels.sum(axis=(3, 4)), golden["tile_pixel_channel_sums"], rtol=0, atol=1e-3)
    assert out.num_image_tokens == golden["num_image_tokens"]
    assert out.seq_lens == golden["seq_lens"]
    assert out.sft_format == golden["sft_format"]


def test_multi_turn_full_pixels():
    golden = load_file(os.path.join(PROCESSOR_GOLDEN_DIR, "vi_multi_turn.pixels.safetensors"))["images"]
    out = run_case(real_vocab_processor(), MODEL_CASES["vi_multi_turn"])
    np.testing.assert_array_equal(out.images.numpy(), golden)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_micro_checkpoint_golden(checkpoint, case):
    golden = load_file(expected_path(checkpoint, case))
    out = run_case(micro_processor(checkpoint), MODEL_CASES[case])
    for key in ("input_ids", "attention_mask", "images_seq_mask", "images_spatial_crop"):
        np.testing.assert_array_equal(out[key].numpy(), golden[key], err_msg=key)
    tile_sums = out.images.numpy().astype(np.float64).sum(axis=(2, 3, 4))
    np.testing.assert_allclose(tile_sums, golden["tile_pixel_sums"], rtol=0, atol=1e-3)


def test_training_labels_golden():
    """fixtures/README.md §8: inference_mode=False keeps the final eos; mask_prompt picks the label tokens."""
    with open(os.path.join(FIXTURES, "expected", "train", "micro-tiny.train.json"), encoding="utf-8") as handle:
        train = json.load(handle)
    golden = load_file(os.path.join(FIXTURES, "expected", "train", "micro-tiny.train.safetensors"))
    conversation = train["conversation"]
    for mask_prompt in (False, True):
        processor = micro_processor("micro-tiny", mask_prompt=mask_prompt)
        out = processor(conversations=conversation, images=image_paths(conversation), inference_mode=False)
        np.testing.assert_array_equal(out.input_ids.numpy(), golden["input_ids"])
        labels = out.labels.numpy()[0]
        n_label_tokens = int((labels[1:] != processor.config.ignore_id).sum())
        assert n_label_tokens == train["runs"][f"mask_prompt={mask_prompt},aux_loss_alpha=0.001"]["n_label_tokens"]
        if mask_prompt:
            answer = processor.encode(conversation[-1]["content"], bos=False, eos=True)
            np.testing.assert_array_equal(labels[1:][labels[1:] != -100], answer)
        else:
            np.testing.assert_array_equal(labels, golden["labels"][0])


# ----------------------------------------------------------------------------------- tiling and counts


def independent_best_resolution(width, height, candidates):
    """select_best_resolution written from its rules: max effective pixels, then min waste, then first."""
    candidates = np.asarray(candidates, dtype=np.int64)
    scale = np.minimum(candidates[:, 0] / width, candidates[:, 1] / height)
    scaled = (width * scale).astype(np.int64) * (height * scale).astype(np.int64)
    effective = np.minimum(scaled, width * height)
    waste = candidates[:, 0] * candidates[:, 1] - effective
    order = np.lexsort((np.arange(len(candidates)), waste, -effective))
    return tuple(int(v) for v in candidates[order[0]])


def independent_token_count(width_tiles, height_tiles, image_size=384, patch_size=14, downsample_ratio=2):
    """Count the image-token layout cell by cell, with the projector's pad-then-unfold grid size."""
    patches = image_size // patch_size
    grid = (patches + (-patches % downsample_ratio)) // downsample_ratio
    global_view = np.ones((grid, grid + 1))  # g rows of g tokens + newline
    local_view = np.ones((height_tiles * grid, width_tiles * grid + 1))  # h·g rows of w·g tokens + newline
    return global_view.size + 1 + local_view.size  # + the view separator


EXTREME_SIZES = [(1, 1), (2, 1), (1, 2), (1, 10000), (10000, 1), (3, 5000), (5000, 3), (383, 385), (384, 384),
                 (385, 383), (767, 384), (768, 385), (1152, 1152), (1153, 1151), (4000, 3000), (3000, 4000),
                 (3457, 384), (384, 3457), (200, 150), (640, 480), (1600, 400), (300, 1000), (500, 300)]


def test_select_best_resolution_many_sizes():
    candidates = DeepseekVLV2ProcessorConfig.from_file(PROCESSOR_CONFIG).candidate_resolutions
    rng = np.random.default_rng(0)
    random_sizes = [tuple(int(v) for v in pair) for pair in rng.integers(1, 4000, size=(400, 2))]
    aspect_sizes = [(int(100 * ratio), 100) for ratio in np.linspace(0.05, 20, 60)]
    for width, height in EXTREME_SIZES + random_sizes + aspect_sizes:
        expected = independent_best_resolution(width, height, candidates)
        assert select_best_resolution((width, height), candidates) == expected, (width, height)


def test_num_image_tokens_formula():
    for width_tiles in range(1, 10):
        for height_tiles in range(1, 10):
            assert num_image_tokens(width_tiles, height_tiles) == independent_token_count(width_tiles, height_tiles)
            assert num_image_tokens(width_tiles, height_tiles) == 211 + 14 * height_tiles * (14 * width_tiles + 1)
    for image_size, patch_size, ratio in [(448, 14, 2), (336, 14, 2), (384, 16, 3), (224, 16, 1), (392, 14, 4)]:
        assert downsampled_grid_size(image_size, patch_size, ratio) == math.ceil((image_size // patch_size) / ratio)
        for width_tiles, height_tiles in [(1, 1), (2, 3), (9, 1)]:
            expected = independent_token_count(width_tiles, height_tiles, image_size, patch_size, ratio)
            assert num_image_tokens(width_tiles, height_tiles, image_size, patch_size, ratio) == expected
    tiles = np.array([[1, 1], [4, 1], [1, 9]])
    vectorised = num_image_tokens(tiles[:, 0], tiles[:, 1])
    assert vectorised.tolist() == [independent_token_count(w, h) for w, h in tiles]


@pytest.mark.parametrize("size", [(1, 1), (1, 10000), (10000, 1), (3, 5000), (383, 385), (1153, 1151), (640, 480)])
def test_processor_tiling_on_synthetic_images(size):
    processor = micro_processor("micro-tiny")
    image = Image.new("RGB", size, (200, 30, 90))
    sample = processor.process_one(conversations=one_image_turn(), images=[image])
    best = independent_best_resolution(*size, processor.config.candidate_resolutions)
    width_tiles, height_tiles = best[0] // 384, best[1] // 384
    assert sample.images_spatial_crop.tolist() == [[width_tiles, height_tiles]]
    assert sample.images.shape == (1 + width_tiles * height_tiles, 3, 384, 384)
    n_tokens = independent_token_count(width_tiles, height_tiles)
    assert sample.num_image_tokens == [n_tokens]
    assert int((sample.input_ids == processor.image_token_id).sum()) == n_tokens
    np.testing.assert_array_equal(sample.images_seq_mask, sample.input_ids == processor.image_token_id)
    assert sample.images.dtype == np.float32 and sample.images.min() >= -1 and sample.images.max() <= 1


def test_more_than_two_images_disable_tiling():
    processor = micro_processor("micro-tiny")
    big = Image.new("RGB", (1600, 400), (10, 20, 30))
    two = processor.process_one(conversations=one_image_turn("<image><image>"), images=[big, big])
    three = processor.process_one(conversations=one_image_turn("<image><image><image>"), images=[big] * 3)
    assert two.images_spatial_crop.tolist() == [[4, 1], [4, 1]]
    assert three.images_spatial_crop.tolist() == [[1, 1]] * 3 and three.images.shape[0] == 6
    # Counted per conversation, across turns.
    split_turns = [
        {"role": "<|User|>", "content": "<image>"},
        {"role": ASSISTANT, "content": "ok"},
        {"role": "user", "content": "<image> and <image>"},
        {"role": "assistant", "content": ""},
    ]
    assert processor.process_one(conversations=split_turns, images=[big] * 3).images_spatial_crop.tolist() == [
        [1, 1]
    ] * 3


# ------------------------------------------------------------------------------------- other call paths


def test_prompt_path_matches_conversation_path():
    processor = real_vocab_processor()
    conversation = MODEL_CASES["ii_one_image"][0]
    reference = run_case(processor, [conversation])
    out = processor(prompt=conversation[0]["content"], images=image_paths(conversation), apply_sft_format=True)
    for key in ("input_ids", "labels", "images_seq_mask", "images_spatial_crop", "images"):
        np.testing.assert_array_equal(out[key].numpy(), reference[key].numpy(), err_msg=key)
    assert out.sft_format == reference.sft_format

    raw = processor.process_one(prompt="Hello <|grounding|>", inference_mode=False)
    expected = [processor.bos_id] + processor.tokenizer.encode("Hello <|grounding|>") + [processor.eos_id]
    assert raw.input_ids.tolist() == expected and raw.sft_format == "Hello <|grounding|>"


def test_system_prompt_only_changes_sft_format():
    processor = real_vocab_processor()
    conversation = MODEL_CASES["i_text_only"][0]
    plain = processor(conversations=conversation)
    with_system = processor(conversations=conversation, system_prompt="Answer briefly.")
    np.testing.assert_array_equal(plain.input_ids.numpy(), with_system.input_ids.numpy())
    assert with_system.sft_format == ["Answer briefly.\n\n" + plain.sft_format[0]]


def test_mask_prompt_labels_only_answers():
    processor = real_vocab_processor(mask_prompt=True)
    conversation = MODEL_CASES["vi_multi_turn"][0]
    sample = processor.process_one(conversations=conversation, images=image_paths(conversation), inference_mode=False)
    answer = processor.encode("A red square.", bos=False, eos=True)
    labelled = sample.labels[sample.labels != -100]
    assert labelled.tolist() == [processor.bos_id] + answer + [processor.eos_id]


def test_batchify_padding_sides_and_outputs():
    processor = real_vocab_processor()
    samples = [processor.process_one(conversations=c, images=image_paths(c)) for c in MODEL_CASES["viii_batch_left_pad"]]
    left = processor.batchify(samples)
    right = processor.batchify(samples, padding="right")
    short = samples[1]
    n = len(short)
    assert right.input_ids.numpy()[1, :n].tolist() == short.input_ids.tolist()
    assert (right.input_ids.numpy()[1, n:] == processor.pad_id).all()
    assert right.attention_mask.numpy()[1].tolist() == [True] * n + [False] * (right.input_ids.shape[1] - n)
    assert (right.labels.numpy()[1, n:] == -100).all() and not right.images_seq_mask.numpy()[1, n:].any()
    np.testing.assert_array_equal(left.input_ids.numpy()[0], right.input_ids.numpy()[0])
    np.testing.assert_array_equal(left.images.numpy(), right.images.numpy())

    assert set(left.keys()) >= {"input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop"}
    assert dict(**left)["input_ids"] is left.input_ids
    half = left.to("bfloat16")
    assert half.images.dtype == paddle.bfloat16 and left.images.dtype == paddle.float32
    assert half.input_ids.dtype == paddle.int64 and half.images_seq_mask.dtype == paddle.bool
    unbatched = processor(conversations=MODEL_CASES["i_text_only"][0], force_batchify=False)
    assert unbatched.input_ids.dtype == np.int64 and unbatched.images.shape == (1, 3, 384, 384)
    assert unbatched.images_spatial_crop.tolist() == [[0, 0]] and not unbatched.images.any()


def test_conversation_templates():
    conv = get_conv_template("deepseek")
    for role, text in [("<|User|>", "Hi"), (ASSISTANT, "Hello."), ("<|User|>", "Bye"), (ASSISTANT, "")]:
        conv.append_message(role, text)
    assert conv.get_prompt() == "<|User|>: Hi\n\n<|Assistant|>: Hello.<｜end▁of▁sentence｜><|User|>: Bye\n\n<|Assistant|>:"
    assert get_conv_template("deepseek").messages == []  # copies do not share messages
    end = "<｜end▁of▁sentence｜>"
    for name, expected in [("plain", "HiHello."), ("alignment", "<image>\nHello."), ("deepseekv2", f"Hi{end}Hello.{end}")]:
        conv = get_conv_template(name)
        conv.append_message(conv.roles[0], "Hi")
        conv.append_message(conv.roles[1], "Hello.")
        conv.append_message(conv.roles[0], "")
        assert conv.get_prompt() == expected, name


# -------------------------------------------------------------------------------------------- bad input


def test_image_tag_count_errors():
    processor = micro_processor("micro-tiny")
    image = Image.new("RGB", (50, 40))
    with pytest.raises(ProcessorInputError, match="2 <image> tags but 1 images"):
        processor(conversations=one_image_turn("<image> <image>"), images=[image])
    with pytest.raises(ProcessorInputError, match="1 <image> tags but 2 images"):
        processor(conversations=one_image_turn(), images=[image, image])
    with pytest.raises(ProcessorInputError, match="0 <image> tags but 1 images"):
        processor(prompt="no tag here", images=[image])
    listed = [dict(one_image_turn()[0], images=["images/small_200x150.png"]), one_image_turn()[1]]
    with pytest.raises(ProcessorInputError, match="pass the images with images="):
        processor(conversations=listed)
    with pytest.raises(ProcessorInputError, match="not a single image"):
        processor(conversations=one_image_turn(), images=image)


def test_image_file_errors(tmp_path):
    processor = micro_processor("micro-tiny")
    with open(IMAGE["scene_640x480.png"], "rb") as handle:
        data = handle.read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("plain text", encoding="utf-8")
    for path in (truncated, not_an_image):
        with pytest.raises(ImageLoadError, match=str(path.name)):
            processor(conversations=one_image_turn(), images=[str(path)])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor(conversations=one_image_turn(), images=[str(tmp_path / "missing.png")])
    with pytest.raises(ImageLoadError, match="zero size"):
        processor(conversations=one_image_turn(), images=[Image.new("RGB", (0, 12))])
    with pytest.raises(ImageLoadError, match="is a folder, not an image file"):
        processor(conversations=one_image_turn(), images=[str(tmp_path)])
    # A header claiming 30000 x 30000 pixels: PIL's decompression-bomb guard, reported like any bad image.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    with pytest.raises(ImageLoadError, match="bomb.png.*decompression bomb.*resize it first"):
        processor(conversations=one_image_turn(), images=[str(bomb)])
    with pytest.raises(TypeError, match="PIL images or file paths"):
        processor(conversations=one_image_turn(), images=[np.zeros((4, 4, 3))])


def test_conversation_errors():
    processor = micro_processor("micro-tiny")
    user = {"role": "<|User|>", "content": "Hi"}
    with pytest.raises(ProcessorInputError, match="empty assistant turn"):
        processor(conversations=[user])
    with pytest.raises(ProcessorInputError, match="empty assistant turn"):
        processor(conversations=[user, {"role": ASSISTANT, "content": "Hello"}])
    assert processor(conversations=[user, {"role": ASSISTANT, "content": "Hello"}], inference_mode=False).seq_lens
    with pytest.raises(ProcessorInputError, match="unknown role 'bot'"):
        processor(conversations=[{"role": "bot", "content": "Hi"}, {"role": ASSISTANT, "content": ""}])
    with pytest.raises(ProcessorInputError, match="system message must be the first"):
        processor(conversations=[user, {"role": "system", "content": "Be nice."}, {"role": ASSISTANT, "content": ""}])
    with pytest.raises(ProcessorInputError, match="images belong in user messages"):
        processor(conversations=[user, {"role": ASSISTANT, "content": "<image>"}], inference_mode=False)
    with pytest.raises(ProcessorInputError, match="string 'content'"):
        processor(conversations=[{"role": "<|User|>"}, {"role": ASSISTANT, "content": ""}])
    with pytest.raises(ProcessorInputError, match="conversation is empty"):
        processor(conversations=[])
    with pytest.raises(ProcessorInputError, match="exactly one of prompt= or conversations="):
        processor(prompt="Hi", conversations=[user])
    with pytest.raises(ValueError, match="padding must be"):
        processor.batchify([processor.process_one(prompt="Hi")], padding="middle")


def test_template_and_config_errors(tmp_path):
    with pytest.raises(UnknownTemplateError, match="known templates: alignment, deepseek, deepseekv2, plain"):
        get_conv_template("llama")
    with pytest.raises(UnknownTemplateError, match="'llama'"):
        micro_processor("micro-tiny", sft_format="llama")
    with pytest.raises(ProcessorConfigError, match="unknown processor config keys"):
        micro_processor("micro-tiny", tile_size=384)
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        DeepseekVLV2Processor.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text("{", encoding="utf-8")
    with pytest.raises(ProcessorConfigError, match="not valid JSON"):
        DeepseekVLV2Processor.from_pretrained(tmp_path)
    with pytest.raises(ProcessorConfigError, match="multiple of the tile size"):
        DeepseekVLV2ProcessorConfig(candidate_resolutions=[[384, 384], [500, 384]])
