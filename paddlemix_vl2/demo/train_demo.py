"""Reproduce the bundled demo model from scratch with the project's fine-tuning stack.

    python -m paddlemix_vl2.demo.train_demo --out DIR --nproc 2 [--work_dir WORK]

One command, fully seeded (``recipe.DemoTrainingSettings``). ``--nproc N`` trains both stages with N
data-parallel processes on the CPU (gloo), each batch split over them. Stage 1 does not depend on N
beyond rounding; stage 2 does a little, since each process averages its loss over the answers of its
own share of the batch before the gradients are averaged. On the 2-core machine two processes of one
thread do more steps per second than one process of two threads.

1. ``WORK/data``: the training set, one conversation per image with all of its questions
   (``conversations.write_conversation_dataset``, seed ``dataset_seed``);
2. ``WORK/init``: the random-initialisation checkpoint in the official layout, with the demo tokenizer
   and processor files (``recipe.write_initial_checkpoint``, seed ``init_seed``);
3. ``WORK/vision``: stage 1, the vision tower of ``WORK/init`` pretrained alone on ``vision_images``
   scenes with throw-away heads (``vision_pretraining``; checkpoints for ``--resume``);
   the model with that tower is written to ``WORK/stage2_init`` (float32);
4. ``WORK/train``: stage 2, the projector and the language model trained from ``WORK/stage2_init`` with
   the tower frozen (``prepare_model(freeze_vision=True)``), with ``paddlemix_vl2.finetune``
   (``load_dataset``, ``FinetuneCollator``, ``Trainer`` with AdamW, warmup + cosine schedule and
   checkpoints every ``--save_steps``; ``--resume`` continues an interrupted run), loss
   ``answer_loss.per_answer_loss``;
5. ``DIR``: the trained weights as bf16 safetensors split into shards of at most ``--max_shard_mb`` plus
   the index, config and processor/tokenizer files; then the checkpoint is reloaded from ``DIR`` and
   scored with ``evaluate.evaluate`` on ``--eval_images`` fresh images (seed ``--eval_seed``).

The phase timings and the figures are logged and written to ``WORK/train_report.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import paddle

from ..cli import CLIArgumentParser
from ..models.deepseek_vl2 import DeepseekVLV2ForCausalLM
from ..models.deepseek_vl2.checkpoint import save_weights
from ..models.deepseek_vl2.modeling_deepseek_vl_v2 import CHECKPOINT_ASSETS
from ..output_folders import check_replaceable
from ..processors import DeepseekVLV2Processor
from ..finetune import FinetuneCollator, Trainer, TrainingConfig, load_dataset, load_model_for_training, prepare_model
from .answer_loss import per_answer_loss
from .conversations import write_conversation_dataset
from .shapes import JSONL_NAME, write_text_atomically
from .evaluate import evaluate
from .recipe import DemoModelSizes, DemoTrainingSettings, write_initial_checkpoint
from .vision_pretraining import pretrain_vision

__all__ = ["train_demo", "write_shipped_checkpoint", "join_or_stop", "parse_args", "main"]

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
) -> Optional[Dict[str, Any]]:
    """Run the whole recipe (see the module docstring) in this process; returns the report (timings,
    figures) on rank 0 and None on the other ranks of a data-parallel run.

    In a data-parallel run every process calls this after ``write_inputs`` has run once (gloo's
    collectives time out long before 15,000 images are drawn); both stages split each batch over the
    processes and rank 0 writes every file.
    """
    world_size, is_first = paddle.distributed.get_world_size(), paddle.distributed.get_rank() == 0
    if world_size > 1 and not paddle.distributed.is_initialized():
        paddle.distributed.init_parallel_env()
    for name, batch in (("vision_batch_size", settings.vision_batch_size), ("train_batch_size", settings.train_batch_size)):
        if batch % world_size:
            raise ValueError(f"{name}={batch} does not split over {world_size} processes; use --nproc dividing it")
    timings: Dict[str, float] = {}
    data_dir, init_dir, vision_dir, stage2_dir, train_dir = (
        os.path.join(work_dir, name) for name in ("data", "init", "vision", "stage2_init", "train")
    )

    if world_size == 1:
        timings["data_and_init_seconds"] = write_inputs(work_dir, settings, sizes, resume)
    jsonl = os.path.join(data_dir, JSONL_NAME)

    processor = DeepseekVLV2Processor.from_pretrained(init_dir, mask_prompt=True)
    started = time.perf_counter()
    vision_history: List[Dict[str, float]] = []
    if not (resume and os.path.isfile(os.path.join(stage2_dir, "config.json"))):
        model = load_model_for_training(init_dir, progress=False)
        vision_history = pretrain_vision(
            model, processor.image_transform, settings.vision_images, settings.vision_seed,
            _stage_config(settings, vision_dir, settings.vision_learning_rate, 1.0,
                          settings.vision_batch_size // world_size, settings.vision_warmup_steps, save_steps),
            (settings.vision_digit_weight, settings.vision_box_weight, settings.vision_count_weight),
            resume=resume,
        )
        if is_first:
            model.save_pretrained(stage2_dir, dtype=paddle.float32, assets_from=init_dir)
        _wait_for_rank_0(world_size)
    timings["vision_pretraining_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    dataset = load_dataset(jsonl, processor, MAX_SEQ_LENGTH)
    model = load_model_for_training(stage2_dir, progress=False)
    prepare_model(model, freeze_vision=True)
    timings["load_and_check_seconds"] = time.perf_counter() - started

    config = _stage_config(settings, train_dir, settings.learning_rate, settings.num_train_epochs,
                           settings.train_batch_size // world_size, settings.warmup_steps, save_steps)
    trainer = Trainer(model, dataset, FinetuneCollator(processor), config, assets_from=init_dir, loss_fn=per_answer_loss)
    started = time.perf_counter()
    history = trainer.train(resume_from_checkpoint="latest" if resume and _has_checkpoint(train_dir) else None)
    timings["training_seconds"] = time.perf_counter() - started
    if not is_first:
        return None

    write_shipped_checkpoint(model, out_dir, init_dir, max_shard_mb)
    started = time.perf_counter()
    shipped = DeepseekVLV2ForCausalLM.from_pretrained(out_dir, progress=False)
    result = evaluate(shipped, DeepseekVLV2Processor.from_pretrained(out_dir), eval_images, eval_seed)
    timings["evaluation_seconds"] = time.perf_counter() - started

    report = {
        "settings": settings.__dict__,
        "sizes": sizes.__dict__,
        "processes": world_size,
        "vision_steps": len(vision_history) or None,  # None: resumed after stage 1
        "vision_final_loss": vision_history[-1]["loss"] if vision_history else None,
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


def write_inputs(work_dir: str, settings: DemoTrainingSettings, sizes: DemoModelSizes, resume: bool) -> float:
    """Write the training conversations (``WORK/data``) and the random-initialisation checkpoint
    (``WORK/init``) unless ``resume`` finds them; returns the seconds taken."""
    started = time.perf_counter()
    data_dir, init_dir = os.path.join(work_dir, "data"), os.path.join(work_dir, "init")
    if not (resume and os.path.isfile(os.path.join(data_dir, JSONL_NAME))):
        write_conversation_dataset(data_dir, settings.train_images, settings.dataset_seed)
    if not (resume and os.path.isfile(os.path.join(init_dir, "config.json"))):
        write_initial_checkpoint(init_dir, sizes, settings.init_seed)
    return time.perf_counter() - started


def _wait_for_rank_0(world_size: int) -> None:
    if world_size > 1:
        paddle.distributed.barrier()


def _stage_config(
    settings: DemoTrainingSettings, output_dir: str, learning_rate: float, epochs: float, batch_size: int,
    warmup_steps: int, save_steps: int,
) -> TrainingConfig:
    """The loop settings of one stage; the optimiser and schedule settings are shared by both."""
    return TrainingConfig(
        output_dir=output_dir,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_grad_norm=settings.max_grad_norm,
        weight_decay=settings.weight_decay,
        adam_beta2=settings.adam_beta2,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=warmup_steps,
        logging_steps=20,
        save_steps=save_steps,
        save_total_limit=1,
        seed=settings.train_seed,
    )


def _has_checkpoint(train_dir: str) -> bool:
    return os.path.isdir(train_dir) and any(name.startswith("checkpoint-") for name in os.listdir(train_dir))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    defaults = DemoTrainingSettings()
    parser = CLIArgumentParser(
        prog="python -m paddlemix_vl2.demo.train_demo",
        description="Train the demo DeepSeek-VL2 model on synthetic shapes from random initialisation.",
    )
    parser.add_argument("--out", required=True, help="folder for the trained checkpoint (official layout)")
    parser.add_argument("--work_dir", default=None, help="data, initial checkpoint, trainer output (default: OUT.work)")
    parser.add_argument("--vision_images", type=int, default=defaults.vision_images, help="stage 1 scenes")
    parser.add_argument("--train_images", type=int, default=defaults.train_images, help="stage 2 conversations")
    parser.add_argument("--epochs", type=float, default=defaults.num_train_epochs)
    parser.add_argument(
        "--box_heads", nargs=3, type=float, metavar=("DIGIT", "BOX", "COUNT"),
        default=(defaults.vision_digit_weight, defaults.vision_box_weight, defaults.vision_count_weight),
        help="stage-1 loss weights of the hundreds-digit, box and count heads (default 0 0 0: presence only, "
             "the shipped model's recipe; README.md's dense-head runs used 0.3 2.0 0.1)",
    )
    parser.add_argument("--eval_images", type=int, default=100)
    parser.add_argument("--eval_seed", type=int, default=7)
    parser.add_argument("--max_shard_mb", type=float, default=2.0)
    parser.add_argument("--save_steps", type=int, default=200, help="trainer checkpoint interval (for --resume)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --work_dir")
    parser.add_argument(
        "--nproc", type=int, default=1,
        help="data-parallel processes (the CPU cores are shared out among them; the batches stay the same)",
    )
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    args.work_dir = args.work_dir or os.path.abspath(args.out) + ".work"
    try:
        check_replaceable(os.path.abspath(args.out))  # now, not after the hour of training
    except FileExistsError as err:
        parser.error(f"--out: {err}")
    if not args.resume and os.path.isdir(args.work_dir) and os.listdir(args.work_dir):
        parser.error(f"the work folder {args.work_dir} holds an earlier run; pass --resume to continue it, "
                     "or choose another --out or --work_dir")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    work_dir = args.work_dir  # parse_args resolves the default (OUT.work)
    if args.nproc == 1:
        return _run(args, work_dir)
    seconds = write_inputs(work_dir, settings_from_args(args), DemoModelSizes(), args.resume)
    # One process per share of the cores: on this small model one thread per process does nearly the
    # work of two in one process (measured: 1.3 against 1.2 s per step of 8 conversations).
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
    join_or_stop(paddle.distributed.spawn(_run_spawned, args=(args, work_dir), nprocs=args.nproc, join=False))
    report_path = os.path.join(work_dir, REPORT_FILE)
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    report["timings"] = {"data_and_init_seconds": round(seconds, 1), **report["timings"]}
    write_text_atomically(report_path, json.dumps(report, indent=1) + "\n")
    return report


def join_or_stop(context: Any, grace_seconds: float = 10.0) -> None:
    """Wait for the processes of a ``paddle.distributed.spawn(join=False)`` context; when this process is
    interrupted or sent SIGTERM, stop them first. Paddle leaves them running otherwise, and an orphaned
    trainer would go on writing checkpoints into the work folder a restarted run is using.

    A process still alive ``grace_seconds`` after SIGTERM is killed: paddle's own SIGTERM handler
    allocates memory, so a SIGTERM that lands inside ``malloc`` deadlocks the process (seen with gdb).
    """
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        while not context.join():
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join(grace_seconds)
            if process.is_alive():
                process.kill()
                process.join()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def settings_from_args(args: argparse.Namespace) -> DemoTrainingSettings:
    """The recipe's settings with the command line's changes (``parse_args``'s namespace)."""
    return DemoTrainingSettings().replace(
        vision_images=args.vision_images, train_images=args.train_images, num_train_epochs=args.epochs,
        vision_digit_weight=args.box_heads[0], vision_box_weight=args.box_heads[1],
        vision_count_weight=args.box_heads[2],
    )


def _run(args: argparse.Namespace, work_dir: str) -> Optional[Dict[str, Any]]:
    settings = settings_from_args(args)
    return train_demo(
        args.out, work_dir, settings, eval_images=args.eval_images, eval_seed=args.eval_seed,
        max_shard_mb=args.max_shard_mb, save_steps=args.save_steps, resume=args.resume,
    )


def _run_spawned(args: argparse.Namespace, work_dir: str) -> None:
    # The default action, not paddle's handler, which can deadlock (see join_or_stop).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _configure_logging()
    if paddle.distributed.get_rank() != 0:
        # The package logger, not the root: importing paddle.distributed installs its own root handler.
        logging.getLogger("paddlemix_vl2").setLevel(logging.WARNING)
    _run(args, work_dir)


def _configure_logging() -> None:
    # force: importing paddle has already given the root logger a handler of its own.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr, force=True)


if __name__ == "__main__":
    _configure_logging()
    main()
