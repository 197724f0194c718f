"""Loading and saving official checkpoints: round trip, layout, and clear errors on bad input."""
import json
import logging
import os
import re
import shutil

import numpy as np
import paddle
import pytest
from safetensors import safe_open

from lm_golden import checkpoint_dir, load_lm
from paddlemix_vl2.models.deepseek_vl2 import CheckpointError, ConfigError, DeepseekV2ForCausalLM, DeepseekVLV2Config
from paddlemix_vl2.models.deepseek_vl2.checkpoint import checkpoint_weight_map, resolve_dtype


def _shapes(path, prefix=""):
    shapes = {}
    for name, file in checkpoint_weight_map(path).items():
        if name.startswith(prefix):
            with safe_open(file, framework="paddle") as f:
                shapes[name[len(prefix):]] = (list(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
    return shapes


@pytest.mark.parametrize("name", ["micro-tiny", "micro-full"])
def test_save_load_round_trip_is_exact(tmp_path, name):
    lm = load_lm(name)
    out = tmp_path / "saved"
    lm.save_pretrained(str(out))
    assert _shapes(str(out)) == _shapes(checkpoint_dir(name), prefix="language.")
    again = DeepseekV2ForCausalLM.from_pretrained(str(out), progress=False)
    for (n1, p1), (n2, p2) in zip(lm.state_dict().items(), again.state_dict().items()):
        assert n1 == n2
        np.testing.assert_array_equal(p1.numpy(), p2.numpy())
    # Torch orientation on disk and in the model: a Linear weight is [out, in].
    with safe_open(str(out / "model.safetensors"), framework="paddle") as f:
        assert f.get_slice("lm_head.weight").get_shape() == [1024, 64]
        np.testing.assert_array_equal(
            f.get_tensor("lm_head.weight").astype("float32").numpy(), lm.lm_head.weight.astype("float32").numpy()
        )
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "staging folder left behind"


def test_sharded_save_writes_index(tmp_path):
    lm = load_lm("micro-small")
    from paddlemix_vl2.models.deepseek_vl2.checkpoint import save_weights

    save_weights(lm, str(tmp_path / "s"), prefix="language.", max_shard_bytes=200_000)
    index = json.load(open(tmp_path / "s" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    official = {k: v for k, v in _shapes(checkpoint_dir("micro-small")).items() if k.startswith("language.")}
    assert _shapes(str(tmp_path / "s")) == official


def _copy_ckpt(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir("micro-tiny"), dst)
    return dst


def test_missing_shard(tmp_path):
    ckpt = _copy_ckpt(tmp_path)
    os.remove(ckpt / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="missing shard file.*model-00002-of-00002"):
        DeepseekV2ForCausalLM.from_pretrained(str(ckpt), progress=False)


def test_truncated_shard(tmp_path):
    ckpt = _copy_ckpt(tmp_path)
    shard = ckpt / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        DeepseekV2ForCausalLM.from_pretrained(str(ckpt), progress=False)


def test_wrong_shape_and_unknown_key(tmp_path):
    ckpt = _copy_ckpt(tmp_path)
    config = json.load(open(ckpt / "config.json"))
    config["language_config"]["intermediate_size"] = 100  # the dense layer no longer fits
    json.dump(config, open(ckpt / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*layers\.0\.mlp\.down_proj"):
        DeepseekV2ForCausalLM.from_pretrained(str(ckpt), progress=False)

    ckpt2 = tmp_path / "ckpt2"
    shutil.copytree(checkpoint_dir("micro-tiny"), ckpt2)
    config = json.load(open(ckpt2 / "config.json"))
    config["language_config"]["num_hidden_layers"] = 2  # layer 2 tensors become unknown keys
    json.dump(config, open(ckpt2 / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"unexpected .*language\.model\.layers\.2\."):
        DeepseekV2ForCausalLM.from_pretrained(str(ckpt2), progress=False)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(Exception, match="config.json"):
        DeepseekV2ForCausalLM.from_pretrained(str(tmp_path), progress=False)


def test_bf16_on_cpu_falls_back_with_one_notice(caplog):
    with caplog.at_level(logging.WARNING):
        dtype = resolve_dtype("bfloat16")
    assert dtype == paddle.float32
    notices = [r for r in caplog.records if "bfloat16" in r.getMessage()]
    assert len(notices) == 1 and "float32" in notices[0].getMessage()
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int4")


def test_bf16_storage_keeps_the_matrices_as_stored_and_refuses_training(monkeypatch):
    """weight_dtype="auto" keeps every Linear matrix and the token embedding table of a bf16 checkpoint in
    bf16, bit for bit as stored, where the CPU kernels read bf16 (the parity tests run both storages against
    the goldens); norms and routers stay float32; such a model refuses train()."""
    from paddlemix_vl2.models.deepseek_vl2 import checkpoint, native
    from paddlemix_vl2.models.deepseek_vl2.layers import Linear, TokenEmbedding

    if not native.bf16_weights_supported():
        pytest.skip("the kernels here do not read bf16 weights (no AVX512BW build): loads keep float32 "
                    "matrices, which every other test of this file checks")
    stored, widened = load_lm("micro-small", "auto"), load_lm("micro-small", "float32")
    linears = {name for name, layer in stored.named_sublayers() if type(layer) in (Linear, TokenEmbedding)}
    assert "model.embed_tokens" in linears
    assert set(checkpoint.bf16_storage_names(stored)) == {f"{name}.weight" for name in linears}
    widened_params = dict(widened.named_parameters())
    for name, param in stored.named_parameters():
        kept = name.rpartition(".")[0] in linears and name.endswith(".weight")
        assert param.dtype == (paddle.bfloat16 if kept else paddle.float32), name
        np.testing.assert_array_equal(param.astype("float32").numpy(), widened_params[name].numpy())
    shard = os.path.join(checkpoint_dir("micro-small"), "model-00001-of-00002.safetensors")
    with safe_open(shard, framework="paddle") as f:
        name = next(n for n in f.keys() if n.startswith("language.") and n.endswith("proj.weight"))
        as_stored = f.get_tensor(name).view(paddle.int16).numpy()
    read = DeepseekV2ForCausalLM.from_pretrained(checkpoint_dir("micro-small"), progress=False, map_weights=False)
    for model in (stored, read):  # mapped from the shard, and read into fresh memory
        np.testing.assert_array_equal(model.state_dict()[name[len("language."):]].view(paddle.int16).numpy(), as_stored)
    assert {n: p.dtype for n, p in read.named_parameters()} == {n: p.dtype for n, p in stored.named_parameters()}
    with pytest.raises(RuntimeError, match="weight_dtype='float32'"):
        stored.train()
    widened.train()
    widened.eval()


def test_a_load_maps_in_every_mapped_matrix_through_a_few_ranges(monkeypatch):
    """The pages of every mapped matrix are populated at load, by one ``populate_pages`` call per run of
    neighbouring matrices (not one per matrix), and the progress bar counts each tensor once."""
    from paddlemix_vl2.models.deepseek_vl2 import checkpoint, native

    if not native.bf16_weights_supported():
        pytest.skip("the kernels here do not read bf16 weights (no AVX512BW build): nothing is mapped")
    ranges, steps = [], []
    populate = checkpoint.populate_pages
    monkeypatch.setattr(checkpoint, "populate_pages", lambda array: (ranges.append(
        (array.ctypes.data, array.ctypes.data + array.nbytes)), populate(array)))
    monkeypatch.setattr(checkpoint._Progress, "step", lambda self: steps.append(1))
    lm = DeepseekV2ForCausalLM.from_pretrained(checkpoint_dir("micro-small"), progress=False)
    matrices = [p for p in lm.parameters() if p.dtype == paddle.bfloat16]
    assert len(matrices) > 4 * len(ranges) > 0
    for matrix in matrices:
        begin = matrix.data_ptr()
        end = begin + int(np.prod(matrix.shape)) * matrix.element_size()
        assert any(low <= begin and end <= high for low, high in ranges), matrix.name
    assert len(steps) == len(lm.state_dict())


def test_bf16_storage_takes_no_gradient_and_passes_float32_ones_to_the_inputs():
    """An eval-mode gradient of a model with bf16-stored matrices: none for those matrices (it would be
    rounded to bf16), float32 ones for the rest and for the inputs, equal to the float32 model's."""
    from paddlemix_vl2.models.deepseek_vl2 import native

    if not native.bf16_weights_supported():
        pytest.skip("the kernels here do not read bf16 weights (no AVX512BW build): nothing is kept in bf16")
    stored, widened = load_lm("micro-small", "auto"), load_lm("micro-small", "float32")
    ids = paddle.to_tensor(np.random.default_rng(0).integers(0, stored.config.vocab_size, size=(1, 12)))
    grads = []
    for model in (stored, widened):
        embeds = model.get_input_embeddings()(ids).detach()
        embeds.stop_gradient = False
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        grads.append((embeds.grad.numpy(), {n: p.grad for n, p in model.named_parameters()}))
    (stored_input, stored_params), (widened_input, widened_params) = grads
    np.testing.assert_allclose(stored_input, widened_input, rtol=1e-5, atol=1e-7)
    for name, param in stored.named_parameters():
        if param.dtype == paddle.bfloat16:
            assert param.stop_gradient and stored_params[name] is None, name
        else:
            assert stored_params[name].dtype == paddle.float32, name
            np.testing.assert_allclose(stored_params[name].numpy(), widened_params[name].numpy(),
                                       rtol=1e-5, atol=1e-7, err_msg=name)
    # The matrices the stored model freezes do take gradients in float32 (every attention output projection).
    projections = [n for n, p in stored.named_parameters() if p.dtype == paddle.bfloat16 and "o_proj" in n]
    assert projections and all(widened_params[name] is not None for name in projections)


def test_bf16_storage_maps_the_file_copy_on_write(tmp_path):
    """The kept matrices are a copy-on-write mapping of the shard: writing a parameter changes the model,
    never the file."""
    from paddlemix_vl2.models.deepseek_vl2 import native

    if not native.bf16_weights_supported():
        pytest.skip("the kernels here do not read bf16 weights (no AVX512BW build), so nothing is mapped: loads "
                    "read float32 copies, which test_save_load_round_trip_is_exact checks")
    folder = tmp_path / "copy"
    shutil.copytree(checkpoint_dir("micro-tiny"), folder)
    before = {name: open(folder / name, "rb").read() for name in os.listdir(folder) if name.endswith(".safetensors")}
    lm = DeepseekV2ForCausalLM.from_pretrained(str(folder), progress=False, weight_dtype="auto")
    weight = lm.lm_head.weight
    assert weight.dtype == paddle.bfloat16
    with paddle.no_grad():
        weight.set_value(paddle.zeros(weight.shape, dtype=paddle.bfloat16))
    assert not weight.astype("float32").numpy().any()
    del lm, weight
    after = {name: open(folder / name, "rb").read() for name in before}
    assert after == before


def test_bad_weight_dtype_is_named():
    with pytest.raises(ValueError, match="unknown weight_dtype 'int8'"):
        DeepseekV2ForCausalLM.from_pretrained(checkpoint_dir("micro-tiny"), progress=False, weight_dtype="int8")


def test_bf16_storage_where_the_kernels_cannot_read_it_is_refused(monkeypatch):
    from paddlemix_vl2.models.deepseek_vl2 import checkpoint

    monkeypatch.setattr(checkpoint, "bf16_weights_supported", lambda: False)
    with pytest.raises(CheckpointError, match="use weight_dtype='float32'"):
        DeepseekV2ForCausalLM.from_pretrained(checkpoint_dir("micro-tiny"), progress=False, weight_dtype="bfloat16")
    auto = DeepseekV2ForCausalLM.from_pretrained(checkpoint_dir("micro-tiny"), progress=False, weight_dtype="auto")
    assert {p.dtype for p in auto.parameters()} == {paddle.float32}


def test_a_float32_matrix_among_bf16_ones_takes_the_plain_path():
    """A LoRA merge into bf16 storage leaves its merged matrices float32: such MLPs and MoE layers leave the
    one-dtype kernel call for the per-Linear path, with the same logits."""
    from paddlemix_vl2.models.deepseek_vl2 import native

    if not native.bf16_weights_supported():
        pytest.skip("the kernels here do not read bf16 weights (no AVX512BW build), so every matrix loads "
                    "float32 and no dtypes mix; test_lora_run_lowers_loss_resumes_exactly_and_merges "
                    "covers the merge there")
    mixed = DeepseekV2ForCausalLM.from_pretrained(checkpoint_dir("micro-small"), progress=False)
    widened = load_lm("micro-small", "float32")
    moe_layer = next(layer.mlp for layer in mixed.model.layers if hasattr(layer.mlp, "experts"))
    expert = moe_layer.experts[0]
    expert.down_proj.weight = paddle.create_parameter(
        expert.down_proj.weight.shape, paddle.float32,
        default_initializer=paddle.nn.initializer.Assign(expert.down_proj.weight.astype("float32")),
    )
    ids = paddle.to_tensor([[5, 17, 3, 99, 42, 7, 11, 250, 31, 64]])
    with paddle.no_grad():
        for rows in (ids, ids[:, :1]):  # prefill rows and one decode-sized row
            np.testing.assert_allclose(
                mixed(input_ids=rows).logits.numpy(), widened(input_ids=rows).logits.numpy(), rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("file, text, error, message", [
    ("config.json", "[1, 2]", ConfigError, "must hold a JSON object, got list"),
    ("model.safetensors.index.json", "[1]", CheckpointError, "must hold a JSON object, got list; re-download it"),
    ("model.safetensors.index.json", '{"weight_map": {"a": 3}}', CheckpointError, "not a valid safetensors index"),
])
def test_json_files_of_the_wrong_shape_are_one_clear_error(tmp_path, file, text, error, message):
    ckpt = _copy_ckpt(tmp_path)
    (ckpt / file).write_text(text, encoding="utf-8")
    with pytest.raises(error, match=message):
        DeepseekV2ForCausalLM.from_pretrained(str(ckpt), progress=False)


def test_a_sub_config_that_is_not_an_object_or_missing_is_named():
    parts = {"model_type": "deepseek_vl_v2", "vision_config": {}, "projector_config": {}}
    with pytest.raises(ConfigError, match="config.json's language_config must be a JSON object, got str"):
        DeepseekVLV2Config.from_dict({**parts, "language_config": "oops"})
    for missing in (parts, {**parts, "language_config": None}):
        with pytest.raises(ConfigError, match="config.json has no language_config"):
            DeepseekVLV2Config.from_dict(missing)


@pytest.mark.parametrize("section, key, value, message", [
    ("language_config", "hidden_size", "big", "language_config.hidden_size='big' must be of type int"),
    ("language_config", "num_hidden_layers", -1, "language_config.num_hidden_layers=-1 must be at least 1"),
    ("language_config", "max_position_embeddings", 0, "must be at least 1"),
    ("language_config", "use_mla", 1, "language_config.use_mla=1 must be of type bool"),
    ("language_config", "rms_norm_eps", True, "must be of type float"),
    ("vision_config", "width", 12.5, "vision_config.width=12.5 must be of type int"),
    ("projector_config", "projector_type", 3, "projector_config.projector_type=3 must be of type str"),
    ("language_config", "rope_scaling", "yarn", "language_config.rope_scaling='yarn' must be null or an object"),
])
def test_values_of_the_wrong_type_or_below_one_name_their_key(section, key, value, message):
    config = {"model_type": "deepseek_vl_v2", "vision_config": {}, "projector_config": {}, "language_config": {}}
    config[section][key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        DeepseekVLV2Config.from_dict(config)


def _rss_file_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc to count mapped pages")
@pytest.mark.parametrize("madvise_works", [True, False])
def test_populate_pages_maps_a_mapped_tensor_in(tmp_path, monkeypatch, madvise_works):
    """``populate_pages`` puts a mapped tensor's pages in the process (its file-backed resident set grows by
    the tensor's size) through madvise, or by reading a value per page where madvise is refused."""
    import mmap

    from paddlemix_vl2.models.deepseek_vl2 import safetensors_shards

    if not madvise_works:
        monkeypatch.setattr(safetensors_shards, "_libc_madvise", lambda: (lambda *args: -1))
    path = tmp_path / "shard.bin"
    path.write_bytes(np.arange(8 << 20, dtype=np.uint16).tobytes())  # 16 MiB
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    array = np.frombuffer(mapping, dtype=np.uint16, count=4 << 20, offset=4096 + 2).reshape(1024, -1)
    before = _rss_file_kib()
    safetensors_shards.populate_pages(array)
    assert _rss_file_kib() - before >= (8 << 20) // 1024 - 8  # the 8 MiB view, bar a page at each end
    flat = array.reshape(-1)  # the values as written, unchanged
    assert int(flat[0]) == 2049 and int(flat[-1]) == (2049 + (4 << 20) - 1) % 65536
    del flat
    del array
    mapping.close()
