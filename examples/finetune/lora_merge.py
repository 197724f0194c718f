"""Merge trained LoRA adapters into the base weights and write an official DeepSeek-VL2 checkpoint.

    python examples/finetune/lora_merge.py --model_name_or_path CKPT --lora_path work_dirs/run/final \\
        --merge_model_path merged

The result loads with ``DeepseekVLV2ForCausalLM.from_pretrained(merged)`` and the inference examples.
The program is ``paddlemix_vl2.finetune.cli.merge_main``.
"""
import sys

from paddlemix_vl2.cli import import_paddle_quietly

import_paddle_quietly()  # before the fine-tuning modules import Paddle with its notices
from paddlemix_vl2.finetune.cli import merge_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(merge_main())
