"""DeepseekTokenizer: ids of the real VL2 vocabulary and of the micro tokenizer, and load errors."""
import json
import os
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, checkpoint_dir

from paddlemix_vl2.processors import DeepseekTokenizer, TokenizerFileError, UnknownTokenError

REAL_VOCAB_DIR = os.path.join(FIXTURES, "tokenizer-vl2")


@pytest.fixture(scope="module")
def real_tokenizer():
    return DeepseekTokenizer.from_pretrained(REAL_VOCAB_DIR)


@pytest.fixture(scope="module")
def micro_tokenizer():
    return DeepseekTokenizer.from_pretrained(checkpoint_dir("micro-tiny"))


def _vocab_entries(directory):
    """(id, content) of every added token of tokenizer.json, read straight from the JSON file."""
    with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as handle:
        data = json.load(handle)
    return {entry["content"]: entry["id"] for entry in data["added_tokens"]}, len(data["model"]["vocab"])


def _special_tokens_map(directory):
    with open(os.path.join(directory, "special_tokens_map.json"), encoding="utf-8") as handle:
        data = json.load(handle)
    return {key: value if isinstance(value, (str, list)) else value["content"] for key, value in data.items()}


@pytest.mark.parametrize("directory", [REAL_VOCAB_DIR, checkpoint_dir("micro-tiny")])
def test_special_tokens_match_the_files(directory):
    tokenizer = DeepseekTokenizer.from_pretrained(directory)
    added, base_size = _vocab_entries(directory)
    special = _special_tokens_map(directory)
    assert tokenizer.bos_token == special["bos_token"] and tokenizer.bos_token_id == added[special["bos_token"]]
    assert tokenizer.eos_token == special["eos_token"] and tokenizer.eos_token_id == added[special["eos_token"]]
    assert tokenizer.pad_token == special["pad_token"] and tokenizer.pad_token_id == added[special["pad_token"]]
    assert tokenizer.additional_special_tokens == special["additional_special_tokens"]
    assert len(tokenizer) == max(max(added.values()) + 1, base_size)
    names = ["<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>"]
    assert tokenizer.convert_tokens_to_ids(names) == [added[name] for name in names]
    assert tokenizer.convert_ids_to_tokens([added[name] for name in names]) == names


def test_real_vocabulary_documented_ids(real_tokenizer):
    # fixtures/README.md §1: bos 0, eos 1, pad 2, <image> 128815, 128823 ids in all.
    assert (real_tokenizer.bos_token_id, real_tokenizer.eos_token_id, real_tokenizer.pad_token_id) == (0, 1, 2)
    assert real_tokenizer.convert_tokens_to_ids("<image>") == 128815
    assert len(real_tokenizer) == 128823
    assert real_tokenizer.add_bos_token is False and real_tokenizer.add_eos_token is False
    assert real_tokenizer.model_max_length == 16384


def test_encode_decode_round_trip(real_tokenizer):
    text = "<|User|>: <|ref|>the red square<|/ref|> 12345 中文 café\n\n<|Assistant|>:"
    ids = real_tokenizer.encode(text)
    assert real_tokenizer.decode(ids) == text
    assert ids[0] == real_tokenizer.convert_tokens_to_ids("<|User|>")
    assert real_tokenizer.convert_tokens_to_ids("<|ref|>") in ids
    # Digits are split in runs of at most three by the pre-tokenizer.
    assert real_tokenizer.encode("12345") == real_tokenizer.encode("123") + real_tokenizer.encode("45")
    with_eos = ids + [real_tokenizer.eos_token_id]
    assert real_tokenizer.decode(with_eos, skip_special_tokens=False).endswith(real_tokenizer.eos_token)
    stripped = real_tokenizer.decode(with_eos, skip_special_tokens=True)
    assert real_tokenizer.eos_token not in stripped and "<|ref|>" not in stripped and "the red square" in stripped
    assert real_tokenizer.decode(np.asarray(ids)) == text
    assert real_tokenizer.decode([]) == ""


def test_batch_encode_and_decode(real_tokenizer):
    texts = ["Hello!", "Who are you?", ""]
    assert real_tokenizer.batch_encode(texts) == [real_tokenizer.encode(t) for t in texts]
    assert real_tokenizer.batch_decode([real_tokenizer.encode(t) for t in texts]) == texts


def test_add_special_tokens_follows_the_config(real_tokenizer):
    ids = real_tokenizer.encode("Hello")
    assert real_tokenizer.encode("Hello", add_special_tokens=True) == ids  # add_bos_token / add_eos_token false
    real_tokenizer.add_bos_token = True
    try:
        assert real_tokenizer.encode("Hello", add_special_tokens=True) == [real_tokenizer.bos_token_id] + ids
        assert real_tokenizer.batch_encode(["Hello"], add_special_tokens=True) == [[real_tokenizer.bos_token_id] + ids]
    finally:
        real_tokenizer.add_bos_token = False


def test_unknown_token_and_id(micro_tokenizer):
    with pytest.raises(UnknownTokenError, match="not in the vocabulary"):
        micro_tokenizer.convert_tokens_to_ids("<no such token>")
    with pytest.raises(UnknownTokenError, match="outside the vocabulary"):
        micro_tokenizer.convert_ids_to_tokens(len(micro_tokenizer) + 5)
    with pytest.raises(ValueError, match="1-D sequence of integer"):
        micro_tokenizer.decode([[1, 2], [3, 4]])


def _copy_tokenizer(tmp_path):
    target = tmp_path / "tok"
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(os.path.join(checkpoint_dir("micro-tiny"), name), target / name)
    return target


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DeepseekTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        DeepseekTokenizer.from_pretrained(tmp_path)
    folder = _copy_tokenizer(tmp_path)
    os.remove(folder / "special_tokens_map.json")
    os.remove(folder / "tokenizer_config.json")
    with pytest.raises(TokenizerFileError, match="no bos_token/eos_token"):
        DeepseekTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
def test_corrupt_files(tmp_path, name):
    folder = _copy_tokenizer(tmp_path)
    (folder / name).write_text('{"truncated": ', encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=name):
        DeepseekTokenizer.from_pretrained(folder)
