"""Loading and saving official checkpoints: round trip, layout, and clear errors on bad input."""
import json
import logging
import os
import shutil

import numpy as np
import paddle
import pytest
from safetensors import safe_open

from lm_golden import checkpoint_dir, load_lm
from paddlemix_vl2.models.deepseek_vl2 import CheckpointError, DeepseekV2ForCausalLM
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
            f.get_tensor("lm_head.weight").astype("float32").numpy(), lm.lm_head.weight.numpy()
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
