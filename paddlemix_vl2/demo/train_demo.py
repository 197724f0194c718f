"""Reproduce the bundled demo model from scratch with the project's fine-tuning stack.

    python -m paddlemix_vl2.demo.train_demo --out DIR [--work_dir WORK]

One command, fully seeded (``recipe.DemoTrainingSettings``):

1. ``WORK/data``: the training set, one conversation per image with all of its questions
   (``conversations.write_conversation_dataset``, seed ``dataset_seed``);
2. ``WORK/init``: the random-initialisation checkpoint in the official layout, with the demo tokenizer
   and processor files (``recipe.write_initial_checkpoint``, seed ``init_seed``);
3. ``WORK/train``: full-parameter training from ``WORK/init`` with ``paddlemix_vl2.finetune``
   (``load_dataset``, ``FinetuneCollator``, ``Trainer`` with AdamW, warmup + cosine schedule and
   checkpoints every ``--save_steps``; ``--resume`` continues an interrupted run), loss
   ``answer_loss.per_answer_loss``;
4. ``DIR``: the trained weights as bf16 safetensors split into shards of at most ``--max_shard_mb`` plus
   the index, config and processor/tokenizer files; then the checkpoint is reloaded from ``DIR`` and
   scored with ``evaluate.evaluate`` on ``--eval_images`` fresh images (seed ``--eval_seed``).

The phase timings and the figures are logged and written to ``WORK/train_report.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import paddle

from ..models.deepseek_vl2 import DeepseekVLV2ForCausalLM
from ..models.deepseek_vl2.checkpoint import save_weights
from ..models.deepseek_vl2.modeling_deepseek_vl_v2 import CHECKPOINT_ASSETS
from ..processors import DeepseekVLV2Processor
from ..finetune import FinetuneCollator, Trainer, TrainingConfig, load_dataset, load_model_for_training, prepare_model
from .answer_loss import per_answer_loss
from .conversations import write_conversation_dataset
from .evaluate import evaluate
from .recipe import DemoModelSizes, DemoTrainingSettings, write_initial_checkpoint

__all__ = ["train_demo", "write_shipped_checkpoint", "parse_args", "main"]

logger = logging.getLogger(__name__)

# No conversation of the data set comes near this; it only guards against a broken record.
MAX_SEQ_LENGTH = 1024
REPORT_FILE = "train_report.json"


def write_shipped_checkpoint(model: DeepseekVLV2ForCausalLM, directory: str, assets_from: str, max_shard_mb: float) -> None:
    """Write ``model`` in the official layout with bf16 shards of at most ``max_shard_mb`` MB and an index,
    plus config.json and the processor/tokenizer files of ``assets_from``."""
    extra = {"config.json": json.dumps(model.config.to_dict(), indent=1, ensure_ascii=False) + "\n"}
    for name in CHECKPOINT_ASSETS:
        with open(os.path.join(assets_from, name), encoding="utf-8") as f:
            extra[name] = f.read()
    save_weights(model, directory, dtype=paddle.bfloat16, max_shard_bytes=int(max_shard_mb * 1e6), extra_files=extra)


def train_demo(
    out_dir: str,
    work_dir: str,
    settings: DemoTrainingSettings = DemoTrainingSettings(),
    sizes: DemoModelSizes = DemoModelSizes(),
    eval_images: int = 100,
    eval_seed: int = 7,
    max_shard_mb: float = 2.0,
    save_steps: int = 200,
    resume: bool = False,
) -> Dict[str, Any]:
    """Run the whole recipe (see the module docstring); returns the report (timings, figures)."""
    timings: Dict[str, float] = {}
    data_dir, init_dir, train_dir = (os.path.join(work_dir, name) for name in ("data", "init", "train"))

    started = time.perf_counter()
    jsonl = os.path.join(data_dir, "train.jsonl")
    if not (resume and os.path.isfile(jsonl)):
        jsonl = write_conversation_dataset(data_dir, settings.train_images, settings.dataset_seed)
    if not (resume and os.path.isfile(os.path.join(init_dir, "config.json"))):
        write_initial_checkpoint(init_dir, sizes, settings.init_seed)
    timings["data_and_init_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    processor = DeepseekVLV2Processor.from_pretrained(init_dir, mask_prompt=True)
    dataset = load_dataset(jsonl, processor, MAX_SEQ_LENGTH)
    model = load_model_for_training(init_dir, progress=False)
    prepare_model(model)
    timings["load_and_check_seconds"] = time.perf_counter() - started

    config = TrainingConfig(
        output_dir=train_dir,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_grad_norm=settings.max_grad_norm,
        weight_decay=settings.weight_decay,
        adam_beta2=settings.adam_beta2,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_steps,
        logging_steps=20,
        save_steps=save_steps,
        save_total_limit=1,
        seed=settings.train_seed,
    )
    trainer = Trainer(model, dataset, FinetuneCollator(processor), config, assets_from=init_dir, loss_fn=per_answer_loss)
    started = time.perf_counter()
    history = trainer.train(resume_from_checkpoint="latest" if resume and _has_checkpoint(train_dir) else None)
    timings["training_seconds"] = time.perf_counter() - started

    write_shipped_checkpoint(model, out_dir, init_dir, max_shard_mb)
    started = time.perf_counter()
    shipped = DeepseekVLV2ForCausalLM.from_pretrained(out_dir, progress=False)
    result = evaluate(shipped, DeepseekVLV2Processor.from_pretrained(out_dir), eval_images, eval_seed)
    timings["evaluation_seconds"] = time.perf_counter() - started

    report = {
        "settings": settings.__dict__,
        "sizes": sizes.__dict__,
        "steps": trainer.total_steps,
        "final_loss": history[-1]["loss"] if history else None,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "evaluation": {"images": eval_images, "seed": eval_seed, **result.to_dict()},
        "load_average": os.getloadavg(),
    }
    with open(os.path.join(work_dir, REPORT_FILE), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    logger.info("report: %s", json.dumps(report))
    return report


def _has_checkpoint(train_dir: str) -> bool:
    return os.path.isdir(train_dir) and any(name.startswith("checkpoint-") for name in os.listdir(train_dir))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    defaults = DemoTrainingSettings()
    parser = argparse.ArgumentParser(
        prog="python -m paddlemix_vl2.demo.train_demo",
        description="Train the demo DeepSeek-VL2 model on synthetic shapes from random initialisation.",
    )
    parser.add_argument("--out", required=True, help="folder for the trained checkpoint (official layout)")
    parser.add_argument("--work_dir", default=None, help="data, initial checkpoint, trainer output (default: OUT.work)")
    parser.add_argument("--train_images", type=int, default=defaults.train_images)
    parser.add_argument("--epochs", type=float, default=defaults.num_train_epochs)
    parser.add_argument("--eval_images", type=int, default=100)
    parser.add_argument("--eval_seed", type=int, default=7)
    parser.add_argument("--max_shard_mb", type=float, default=2.0)
    parser.add_argument("--save_steps", type=int, default=200, help="trainer checkpoint interval (for --resume)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --work_dir")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    settings = DemoTrainingSettings().replace(train_images=args.train_images, num_train_epochs=args.epochs)
    work_dir = args.work_dir or os.path.abspath(args.out) + ".work"
    return train_demo(
        args.out, work_dir, settings, eval_images=args.eval_images, eval_seed=args.eval_seed,
        max_shard_mb=args.max_shard_mb, save_steps=args.save_steps, resume=args.resume,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    main()
