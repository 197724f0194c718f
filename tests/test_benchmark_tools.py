"""Tests for benchmarks/make_random_checkpoint.py, benchmarks/checkpoint_layout.py and benchmarks/roofline.py.

The written checkpoints are checked against the micro fixtures (which were made by the official PyTorch
code), the parameter totals against the published model sizes, and the bf16 rounding against Paddle's cast.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import checkpoint_dir

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS_DIR = os.path.join(TESTS_DIR, "..", "benchmarks")
# The benchmark scripts import their siblings by bare name, as they do when run as scripts.
sys.path.insert(0, BENCHMARKS_DIR)

import checkpoint_layout  # noqa: E402
import make_random_checkpoint as mrc  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_safetensors_header(path):
    """Header dict of a safetensors file, parsed by hand (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        return length, json.loads(file.read(length))


def checkpoint_tensors(folder):
    """name -> (dtype, shape) over all shards of a checkpoint, checking the index as it goes."""
    with open(os.path.join(folder, "model.safetensors.index.json")) as file:
        index = json.load(file)
    tensors = {}
    data_bytes = 0
    for shard in sorted(set(index["weight_map"].values())):
        path = os.path.join(folder, shard)
        assert os.path.isfile(path), f"index points at missing shard {shard}"
        length, header = read_safetensors_header(path)
        header.pop("__metadata__", None)
        end = 0
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
            start, stop = entry["data_offsets"]
            assert start == end, f"{shard}: {name} does not start where the previous tensor ends"
            assert stop - start == 2 * math.prod(entry["shape"])
            assert index["weight_map"][name] == shard
            end = stop
            tensors[name] = (entry["dtype"], tuple(entry["shape"]))
        assert os.path.getsize(path) == 8 + length + end
        data_bytes += end
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == data_bytes
    return tensors


def shapes_of(tensors):
    return {name: shape for name, (_, shape) in tensors.items()}


def fixture_config(name):
    with open(os.path.join(checkpoint_dir(name), "config.json")) as file:
        return json.load(file)


def write_like_fixture(name, out_dir, **kwargs):
    """Write a random checkpoint with a micro fixture's config, tokenizer and processor files."""
    return mrc.write_checkpoint(
        fixture_config(name), out_dir, tokenizer_dir=checkpoint_dir(name),
        processor_config_path=os.path.join(checkpoint_dir(name), "processor_config.json"), **kwargs,
    )


def run_script(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=TESTS_DIR, check=True)


def test_micro_cli_writes_the_micro_tiny_layout(tmp_path):
    out_dir = tmp_path / "micro"
    result = run_script(os.path.join(BENCHMARKS_DIR, "make_random_checkpoint.py"), "--arch", "micro",
                        "--out", str(out_dir), "--max_shard_size", "300KB")
    assert "peak RSS" in result.stdout
    reference = checkpoint_dir("micro-tiny")
    with open(out_dir / "config.json") as file:
        assert json.load(file) == fixture_config("micro-tiny")
    for name in ("processor_config.json", *TOKENIZER_FILES):
        with open(out_dir / name, "rb") as written, open(os.path.join(reference, name), "rb") as expected:
            assert written.read() == expected.read(), name
    written = checkpoint_tensors(out_dir)
    assert {dtype for dtype, _ in written.values()} == {"BF16"}
    assert shapes_of(written) == shapes_of(checkpoint_tensors(reference))
    shards = sorted(path.name for path in out_dir.glob("*.safetensors"))
    assert len(shards) > 1
    assert shards == [f"model-{i:05d}-of-{len(shards):06d}.safetensors" for i in range(1, len(shards) + 1)]
    assert [path.name for path in tmp_path.iterdir()] == ["micro"]


@pytest.mark.parametrize("name", ["micro-small", "micro-full"])
def test_mla_and_noaux_configs_give_the_fixture_layout(tmp_path, name):
    write_like_fixture(name, tmp_path / name, max_shard_bytes=400_000)
    written = checkpoint_tensors(tmp_path / name)
    assert shapes_of(written) == shapes_of(checkpoint_tensors(checkpoint_dir(name)))
    assert {dtype for dtype, _ in written.values()} == {"BF16"}


def test_values_open_in_safetensors_and_follow_the_init(tmp_path):
    paddle = pytest.importorskip("paddle")
    from safetensors import safe_open

    write_like_fixture("micro-full", tmp_path / "ckpt", max_shard_bytes=400_000)
    with open(tmp_path / "ckpt" / "model.safetensors.index.json") as file:
        weight_map = json.load(file)["weight_map"]
    values = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(tmp_path / "ckpt" / shard), framework="paddle") as file:
            assert file.metadata() == {"format": "pt"}
            for name in file.keys():
                tensor = file.get_tensor(name)
                assert tensor.dtype == paddle.bfloat16
                values[name] = tensor.astype("float32").numpy()
    assert set(values) == set(weight_map)
    norm_weights = [name for name in values if name.endswith(("norm.weight", "norm1.weight", "norm2.weight",
                                                              "layernorm.weight"))]
    biases = [name for name in values if name.endswith(("bias", "e_score_correction_bias"))]
    assert len(norm_weights) == 2 * 2 + 1 + 1 + 3 * 3 + 1
    assert all(np.all(values[name] == 1.0) for name in norm_weights)
    assert all(np.all(values[name] == 0.0) for name in biases)
    embedding = values["language.model.embed_tokens.weight"].astype(np.float64)
    standard_error = 0.02 / math.sqrt(embedding.size)
    assert abs(embedding.mean()) < 5 * standard_error
    assert abs(embedding.std() / 0.02 - 1) < 0.02


def test_same_seed_gives_same_bytes_whatever_the_chunk_size(tmp_path):
    write_like_fixture("micro-tiny", tmp_path / "a", seed=3)
    write_like_fixture("micro-tiny", tmp_path / "b", seed=3, chunk_elements=997)
    write_like_fixture("micro-tiny", tmp_path / "c", seed=4)
    shard = "model-00001-of-000001.safetensors"
    a, b, c = ((tmp_path / name / shard).read_bytes() for name in "abc")
    assert a == b
    assert len(a) == len(c) and a != c


def test_bfloat16_rounding_matches_paddle_cast():
    paddle = pytest.importorskip("paddle")
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(200_000) * np.exp(rng.uniform(-20, 20, 200_000))).astype(np.float32)
    expected = paddle.to_tensor(values).astype("bfloat16").view("uint16").numpy()
    np.testing.assert_array_equal(mrc.float32_to_bfloat16_bits(values), expected)
    # Half-way cases by hand: 1 + 2**-8 rounds down to 1.0 (even), 1 + 3 * 2**-8 up to 1 + 2**-6 (even).
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], dtype=np.float32)
    np.testing.assert_array_equal(mrc.float32_to_bfloat16_bits(ties), [0x3F80, 0x3F82, 0xBF80])


@pytest.mark.parametrize("arch, total", [
    ("tiny", 3_370_501_440),
    ("small", 16_148_349_504),
    ("full", 27_480_134_248),
])
def test_parameter_count_matches_published_totals(arch, total):
    spec = checkpoint_layout.ModelSpec.from_config(checkpoint_layout.official_config(arch))
    assert checkpoint_layout.parameter_count(spec) == total


@pytest.mark.parametrize("name", ["micro-tiny", "micro-small", "micro-full"])
def test_parameter_count_equals_fixture_tensor_sizes(name):
    fixture_shapes = shapes_of(checkpoint_tensors(checkpoint_dir(name)))
    fixture_total = sum(math.prod(shape) for shape in fixture_shapes.values())
    spec = checkpoint_layout.ModelSpec.from_config(fixture_config(name))
    assert checkpoint_layout.parameter_count(spec) == fixture_total


def test_real_size_shapes_follow_the_reference_notes():
    def shapes(arch, layers=None):
        spec = checkpoint_layout.ModelSpec.from_config(checkpoint_layout.official_config(arch, layers))
        return {tensor.name: tensor.shape for tensor in checkpoint_layout.tensor_specs(spec)}

    tiny = shapes("tiny")
    assert tiny["vision.blocks.26.mlp.fc1.weight"] == (4304, 1152)
    assert tiny["vision.attn_pool.kv.weight"] == (2304, 1152)
    assert tiny["vision.attn_pool.latent"] == (1, 1, 1152)
    assert tiny["projector.layers.0.weight"] == (1280, 4608)
    assert tiny["language.model.layers.0.mlp.gate_proj.weight"] == (6848, 1280)
    assert tiny["language.model.layers.11.self_attn.k_proj.weight"] == (1280, 1280)
    assert tiny["language.model.layers.11.mlp.experts.63.down_proj.weight"] == (1280, 896)
    assert tiny["language.model.layers.1.mlp.shared_experts.up_proj.weight"] == (1792, 1280)
    assert tiny["language.lm_head.weight"] == (129280, 1280)
    assert not any("e_score_correction_bias" in name for name in tiny)
    small = shapes("small", layers=4)
    assert max(int(name.split(".")[3]) for name in small if name.startswith("language.model.layers.")) == 3
    assert small["language.model.layers.3.self_attn.q_proj.weight"] == (3072, 2048)
    assert small["language.model.layers.3.self_attn.kv_a_proj_with_mqa.weight"] == (576, 2048)
    assert small["language.model.layers.3.self_attn.kv_b_proj.weight"] == (4096, 512)
    assert small["language.model.embed_tokens.weight"] == (102400, 2048)
    full = shapes("full", layers=2)
    assert full["language.model.layers.1.self_attn.q_proj.weight"] == (6144, 2560)
    assert full["language.model.layers.1.mlp.gate.e_score_correction_bias"] == (72,)
    assert full["language.model.layers.1.mlp.shared_experts.gate_proj.weight"] == (3072, 2560)


def test_dry_run_prints_the_tiny_count_and_writes_nothing(tmp_path):
    result = run_script(os.path.join(BENCHMARKS_DIR, "make_random_checkpoint.py"), "--arch", "tiny",
                        "--out", str(tmp_path / "tiny"), "--dry_run")
    assert "3,370,501,440 parameters" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def interrupt_after_a_few(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(mrc, "_write_tensor_data", interrupt_after_a_few)
    with pytest.raises(KeyboardInterrupt):
        write_like_fixture("micro-tiny", tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_existing_target_is_kept_unless_overwrite(tmp_path):
    out_dir = tmp_path / "ckpt"
    write_like_fixture("micro-tiny", out_dir, seed=1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_like_fixture("micro-tiny", out_dir, seed=2)
    before = (out_dir / "model-00001-of-000001.safetensors").read_bytes()
    write_like_fixture("micro-tiny", out_dir, seed=2, overwrite=True)
    assert (out_dir / "model-00001-of-000001.safetensors").read_bytes() != before
    assert [path.name for path in tmp_path.iterdir()] == ["ckpt"]


def test_bad_input_gets_a_clear_error():
    with pytest.raises(checkpoint_layout.CheckpointConfigError, match="tile_tag"):
        checkpoint_layout.ModelSpec.from_config({**fixture_config("micro-tiny"), "tile_tag": "1D"})
    with pytest.raises(checkpoint_layout.CheckpointConfigError, match="--layers"):
        checkpoint_layout.official_config("small", 0)
    with pytest.raises(ValueError, match="2GB"):
        mrc.parse_size("two gigabytes")
    assert mrc.parse_size("2GB") == 2 * 10**9
    assert mrc.parse_size("1GiB") == 2**30


def test_roofline_quick_gives_every_key(tmp_path):
    json_path = tmp_path / "roofline.json"
    result = run_script(os.path.join(BENCHMARKS_DIR, "roofline.py"), "--quick", "--json", str(json_path))
    assert "GFLOP/s" in result.stdout
    with open(json_path) as file:
        measured = json.load(file)
    import roofline

    for key in roofline.RESULT_KEYS:
        assert key in measured, key
    rates = ("matmul_gflops_2048", "matmul_gflops_vit_fc1", "read_bandwidth_gbs", "gemv_bandwidth_gbs")
    for key in rates:
        assert measured[key] > 0 and measured[key + "_median"] > 0, key
        assert measured[key] >= measured[key + "_median"], key
    for key in ("package_gemm_gflops_2048", "package_gemm_gflops_vit_fc1", "package_gemv_bandwidth_gbs"):
        assert measured[key] is None or measured[key] >= measured[key + "_median"] > 0, key
    assert isinstance(measured["cpu_model"], str) and measured["cpu_model"]
    from paddlemix_vl2.models.deepseek_vl2 import native

    assert measured["amx_gemm"] is native.amx_gemm_runs()  # a fact of this machine, run in another process
    assert isinstance(measured["avx512"], bool)
    assert measured["quick"] is True


def test_kept_operands_are_made_once_and_fresh_ones_every_time():
    import roofline

    kept, fresh = roofline.Operands(keep=True), roofline.Operands()
    first = kept.get([4, 8], roofline._normal)
    assert kept.get([4, 8], roofline._normal) is first and kept.get([8, 4], roofline._normal) is not first
    assert kept.get([4, 8], roofline._half) is not first
    assert fresh.get([4, 8], roofline._normal) is not fresh.get([4, 8], roofline._normal)
    assert first.shape == [4, 8] and str(first.dtype) == "paddle.float32"
