"""Shared helpers for comparing against the official float32 goldens (tests/fixtures/README.md §6)."""
import functools
import os

import numpy as np
from safetensors.numpy import load_file

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
CHECKPOINTS = ("micro-tiny", "micro-small", "micro-full")
CASES = (
    "i_text_only", "ii_one_image", "iii_wide_image", "iv_two_images",
    "v_three_images", "vi_multi_turn", "vii_grounding", "viii_batch_left_pad",
)
LOGIT_ATOL = 5e-4
LOGIT_ATOL_AFTER_NEAR_TIE = 5e-3
ROUTER_GAP = 1e-5
GREEDY_MARGIN = 1e-3


def checkpoint_dir(name):
    return os.path.join(FIXTURES, "checkpoints", name)


@functools.lru_cache(maxsize=None)
def expected(name, case):
    return load_file(os.path.join(FIXTURES, "expected", name, f"{case}.safetensors"))


# How the bf16 fixture checkpoints' matrices are held: "auto" keeps them bf16 where the CPU kernels read
# them (this machine: AVX512BW), "float32" widens them at load. The goldens hold for both.
WEIGHT_DTYPES = ("auto", "float32")


@functools.lru_cache(maxsize=None)
def load_lm(name, weight_dtype="auto"):
    from paddlemix_vl2.models.deepseek_vl2 import DeepseekV2ForCausalLM

    return DeepseekV2ForCausalLM.from_pretrained(checkpoint_dir(name), progress=False, weight_dtype=weight_dtype)


def assert_logits_match(logits, exp):
    """logits: [B, P, V] at exp['logits_positions'].

    The README's rule: in each row, positions up to the first valid token whose layer-1 router gap is
    below 1e-5 at atol 5e-4, later ones at 5e-3; positions that are themselves near-ties in any MoE
    layer are skipped (a correct fp32 port may pick another k-th expert there). Padding is skipped.
    """
    positions = exp["logits_positions"]
    bsz, seq_len = exp["attention_mask"].shape
    gaps = exp["router_gap_all_moe_layers"].reshape(-1, bsz, seq_len)  # [layers, B, T]
    near_tie = (gaps < ROUTER_GAP).any(axis=0)  # [B, T]
    layer1_tie = gaps[0] < ROUTER_GAP
    checked = 0
    for row in range(bsz):
        valid = exp["attention_mask"][row]
        first_tie = np.flatnonzero(layer1_tie[row] & valid)
        first_tie = first_tie[0] if len(first_tie) else seq_len
        for j, pos in enumerate(positions):
            if not valid[pos] or near_tie[row, pos]:
                continue
            atol = LOGIT_ATOL if pos <= first_tie else LOGIT_ATOL_AFTER_NEAR_TIE
            diff = np.abs(logits[row, j] - exp["logits"][row, j]).max()
            assert diff <= atol, f"row {row} position {pos}: max |dlogit| {diff:.2e} > {atol}"
            checked += 1
    assert checked > 0


def assert_greedy_match(tokens, exp):
    """tokens: [B, 12]. Compare step by step until a row's first step with margin below 1e-3."""
    for row in range(tokens.shape[0]):
        for step in range(exp["gen_tokens"].shape[1]):
            if exp["gen_margin"][step, row] < GREEDY_MARGIN:
                break
            assert tokens[row, step] == exp["gen_tokens"][row, step], f"row {row} step {step}"


@functools.lru_cache(maxsize=None)
def load_vl(name, weight_dtype="auto"):
    from paddlemix_vl2.models.deepseek_vl2 import DeepseekVLV2ForCausalLM

    return DeepseekVLV2ForCausalLM.from_pretrained(checkpoint_dir(name), progress=False, weight_dtype=weight_dtype)


@functools.lru_cache(maxsize=None)
def load_processor(name):
    from paddlemix_vl2.processors import DeepseekVLV2Processor

    return DeepseekVLV2Processor.from_pretrained(checkpoint_dir(name))


@functools.lru_cache(maxsize=None)
def cases_json():
    import json

    with open(os.path.join(FIXTURES, "expected", "cases.json"), encoding="utf-8") as f:
        return {c["id"]: c for c in json.load(f)["cases"]}


def process_case(name, case):
    """Run the processor on a golden case exactly as the fixtures README §4 says."""
    from PIL import Image

    processor = load_processor(name)
    conversations = cases_json()[case]["conversations"]

    def images_of(conv):
        return [Image.open(os.path.join(FIXTURES, p)).convert("RGB") for m in conv for p in m.get("images", [])]

    kwargs = dict(inference_mode=True, system_prompt="")
    if len(conversations) == 1:
        return processor(conversations=conversations[0], images=images_of(conversations[0]), force_batchify=True, **kwargs)
    samples = [processor.process_one(conversations=c, images=images_of(c), **kwargs) for c in conversations]
    return processor.batchify(samples)
