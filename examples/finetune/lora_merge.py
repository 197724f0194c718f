"""Merge trained LoRA adapters into the base weights and write an official DeepSeek-VL2 checkpoint.

    python examples/finetune/lora_merge.py --model_name_or_path CKPT --lora_path work_dirs/run/final \\
        --merge_model_path merged

The result loads with ``DeepseekVLV2ForCausalLM.from_pretrained(merged)`` and the inference examples.
The program is ``paddlemix_vl2.finetune.cli.merge_main``, run by ``paddlemix_vl2.cli.lora_merge_main``, which
first checks Paddle.
"""
import sys

from paddlemix_vl2.cli import lora_merge_main

if __name__ == "__main__":
    sys.exit(lora_merge_main())
