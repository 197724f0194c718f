"""Fine-tune DeepSeek-VL2 on a conversation dataset (full-parameter or LoRA).

    python examples/finetune/finetune.py --model_path CKPT --dataset train.jsonl --output_dir work_dirs/run [--lora]

Several GPUs: ``python -m paddle.distributed.launch --gpus 0,1 examples/finetune/finetune.py ...``.
The program is ``paddlemix_vl2.finetune.cli.main`` (install the package first: ``pip install -e .``), run by
``paddlemix_vl2.cli.finetune_main``, which first checks Paddle;
``--help`` lists the flags and paddlemix_vl2/finetune/README.md describes the data format.
"""
import sys

from paddlemix_vl2.cli import finetune_main

if __name__ == "__main__":
    sys.exit(finetune_main())
