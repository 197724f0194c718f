"""Command lines: ``finetune`` (SFT or LoRA on a JSON/JSONL dataset) and ``lora_merge``.

Flag names are those of PaddleMIX's ``deepseek_vl2_finetune.py`` / PaddleNLP's ``TrainingArguments``
where they exist; boolean flags take an optional value (``--lora``, ``--lora True``, ``--lora false``), as
PdArgumentParser does. Flags of PaddleMIX's scripts that have no meaning here are accepted and ignored
with a notice, so its shell scripts run unchanged; parallel degrees above 1 are refused.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, List, Optional, Sequence

import paddle

from ..cli import CLIArgumentParser, call_reporting_errors, user_errors
from ..models.deepseek_vl2 import DeepseekVLV2ForCausalLM
from ..models.deepseek_vl2.checkpoint import DTYPES_BY_NAME
from ..output_folders import check_replaceable
from ..processors import DeepseekVLV2Processor
from .build import load_model_for_training, prepare_model
from .data import FinetuneCollator, load_dataset
from .lora import DEFAULT_TARGET_MODULES, LoRAConfig, load_adapters, merge_lora
from .trainer import Trainer, TrainingConfig

__all__ = ["parse_args", "main", "parse_merge_args", "merge_main"]

logger = logging.getLogger("paddlemix_vl2.finetune")

# PaddleMIX / PaddleNLP flags that change nothing in this single-process trainer.
IGNORED_FLAGS = (
    "do_train", "dataloader_num_workers", "report_to", "evaluation_strategy",
    "save_strategy", "logging_dir", "conv_style", "fp16_opt_level", "use_data_resampling", "image_resolution",
    "amp_master_grad", "sharding", "hybrid_parallel_topo_order", "recompute", "disable_tqdm", "optim",
)
PARALLEL_FLAGS = (
    "tensor_parallel_degree", "sharding_parallel_degree", "pipeline_parallel_degree", "sep_parallel_degree",
)


def _str2bool(value: str) -> bool:
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "y"):
        return True
    if lowered in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _add_bool(parser, *names: str, default: Optional[bool], help: str, dest: Optional[str] = None) -> None:
    extra = {"dest": dest} if dest else {}
    parser.add_argument(*names, type=_str2bool, nargs="?", const=True, default=default, help=help, **extra)


def _build_parser() -> argparse.ArgumentParser:
    parser = CLIArgumentParser(
        prog="finetune.py",
        description="Fine-tune DeepSeek-VL2 (full-parameter or LoRA) on a conversation dataset.",
    )
    model = parser.add_argument_group("model and data")
    model.add_argument("--model_path", "--model_name_or_path", dest="model_path", required=True,
                       help="DeepSeek-VL2 checkpoint folder (config.json, safetensors, processor files)")
    model.add_argument("--dataset", "--meta_path", dest="dataset", required=True,
                       help="a .json list or .jsonl file of records, or a PaddleMIX mixture .json")
    model.add_argument("--output_dir", required=True, help="checkpoints go to checkpoint-<step>/, the result to final/")
    model.add_argument("--max_seq_length", type=int, default=4096, help="records with more tokens are skipped")
    _add_bool(model, "--mask_prompt", default=True,
              help="loss on assistant answers and their eos only (default true); false: on every non-image token")
    model.add_argument("--dtype", default=None, help="float32 or bfloat16; default float32 on CPU, bfloat16 on GPU")
    _add_bool(model, "--bf16", default=False, help="same as --dtype bfloat16 (GPU only; CPU computes in float32)")
    _add_bool(model, "--fp16", default=False, help="not supported (no loss scaling); use --bf16")
    model.add_argument("--aux_loss_alpha", type=float, default=None,
                       help="MoE load-balancing loss weight (default: config)")
    _add_bool(model, "--seq_aux", default=None, help="per-sequence aux loss (default: config)")

    parts = parser.add_argument_group("what trains (full-parameter training)")
    _add_bool(parts, "--freeze_vision", "--freeze_vit", dest="freeze_vision", default=False,
              help="freeze the SigLIP tower")
    _add_bool(parts, "--freeze_projector", default=False, help="freeze the projector, image_newline and view_seperator")
    _add_bool(parts, "--freeze_language", "--freeze_llm", dest="freeze_language", default=False,
              help="freeze the language model")

    lora = parser.add_argument_group("LoRA (base weights frozen, adapters train)")
    _add_bool(lora, "--lora", default=False, help="train LoRA adapters")
    lora.add_argument("--lora_rank", type=int, default=8)
    lora.add_argument("--lora_alpha", type=float, default=32.0)
    lora.add_argument("--lora_dropout", type=float, default=0.05)
    lora.add_argument("--lora_target_modules", default=",".join(DEFAULT_TARGET_MODULES),
                      help="comma-separated full-match regexes over module names (default: attention, dense MLP, "
                           "shared and routed experts of the language model)")
    lora.add_argument("--lora_path", default=None, help="start from these adapters (their lora_config.json wins)")

    loop = parser.add_argument_group("training loop")
    loop.add_argument("--learning_rate", type=float, default=1e-5)
    loop.add_argument("--num_train_epochs", type=float, default=1.0)
    loop.add_argument("--max_steps", type=int, default=-1, help="> 0 overrides --num_train_epochs")
    loop.add_argument("--per_device_train_batch_size", type=int, default=1)
    loop.add_argument("--gradient_accumulation_steps", type=int, default=1)
    loop.add_argument("--max_grad_norm", type=float, default=1.0, help="<= 0 disables clipping")
    loop.add_argument("--weight_decay", type=float, default=0.0)
    loop.add_argument("--lr_scheduler_type", default="cosine", help="cosine, linear or constant")
    loop.add_argument("--warmup_ratio", type=float, default=0.0)
    loop.add_argument("--warmup_steps", type=int, default=0, help="> 0 overrides --warmup_ratio")
    loop.add_argument("--logging_steps", type=int, default=10)
    loop.add_argument("--save_steps", type=int, default=500, help="checkpoint every N steps (<= 0: none)")
    loop.add_argument("--save_total_limit", type=int, default=0, help="keep only the newest N checkpoints (<= 0: all)")
    loop.add_argument("--seed", type=int, default=42)
    _add_bool(loop, "--overwrite_output_dir", default=False,
              help="a fresh run deletes the checkpoints an earlier run left in --output_dir (without it: refused)")
    loop.add_argument("--resume_from_checkpoint", default=None,
                      help="a checkpoint-<step> folder, or 'latest' (also 'true') for the newest in --output_dir")

    compat = parser.add_argument_group("accepted for PaddleMIX scripts")
    for name in IGNORED_FLAGS:
        compat.add_argument(f"--{name}", nargs="?", const="true", default=None, help=argparse.SUPPRESS)
    for name in PARALLEL_FLAGS:
        compat.add_argument(f"--{name}", type=int, default=1, help="only 1 is supported")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = _build_parser().parse_args(argv)
    if args.resume_from_checkpoint and args.resume_from_checkpoint.lower() in ("true", "latest"):
        args.resume_from_checkpoint = "latest"
    elif args.resume_from_checkpoint and args.resume_from_checkpoint.lower() in ("false", "none"):
        args.resume_from_checkpoint = None
    return args


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def _training_dtype(args: argparse.Namespace) -> Optional[str]:
    if args.fp16:
        raise ValueError("--fp16 training is not supported (no loss scaling); use --bf16 on GPUs with bfloat16")
    return "bfloat16" if args.bf16 else args.dtype


def run(args: argparse.Namespace) -> List[dict]:
    """Fine-tune as the parsed flags say; returns the per-step history."""
    for name in IGNORED_FLAGS:
        if getattr(args, name) is not None:
            logger.info("--%s is accepted for PaddleMIX compatibility and ignored", name)
    for name in PARALLEL_FLAGS:
        if getattr(args, name) > 1:
            raise ValueError(
                f"--{name} {getattr(args, name)} is not supported; use data parallelism (paddle.distributed.launch)"
            )
    dtype = _training_dtype(args)
    config = TrainingConfig(
        output_dir=args.output_dir, learning_rate=args.learning_rate, num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
        weight_decay=args.weight_decay, lr_scheduler_type=args.lr_scheduler_type, warmup_ratio=args.warmup_ratio,
        warmup_steps=args.warmup_steps, logging_steps=args.logging_steps, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, seed=args.seed, overwrite_output_dir=args.overwrite_output_dir,
    )
    config.check_output_dir(resuming=bool(args.resume_from_checkpoint))  # before loading; train() checks again
    processor = DeepseekVLV2Processor.from_pretrained(args.model_path, mask_prompt=args.mask_prompt)
    dataset = load_dataset(args.dataset, processor, args.max_seq_length)
    model = load_model_for_training(
        args.model_path, dtype=dtype, aux_loss_alpha=args.aux_loss_alpha, seq_aux=args.seq_aux
    )
    # Seeds the LoRA initialisation (or nothing, for full-parameter runs).
    paddle.seed(args.seed)
    if args.lora_path:
        lora_config = load_adapters(model, args.lora_path)
    else:
        lora_config = None
        if args.lora:
            lora_config = LoRAConfig(
                r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                target_modules=[p.strip() for p in args.lora_target_modules.split(",") if p.strip()],
                base_model_name_or_path=os.path.abspath(args.model_path),
            )
        prepare_model(model, lora_config, args.freeze_vision, args.freeze_projector, args.freeze_language)
    trainer = Trainer(model, dataset, FinetuneCollator(processor), config, lora_config, assets_from=args.model_path)
    return trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``finetune.py``: returns the exit code (2 with one ``error:`` line for bad input)."""
    args = parse_args(argv)
    _configure_logging()
    return _run_reporting_errors(lambda: run(args))


def parse_merge_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = CLIArgumentParser(
        prog="lora_merge.py",
        description="Merge LoRA adapters into the base weights and write an official DeepSeek-VL2 checkpoint.",
    )
    parser.add_argument("--model_name_or_path", "--model_path", dest="model_path", required=True,
                        help="base checkpoint folder")
    parser.add_argument("--lora_path", required=True,
                        help="adapter folder (final/ or a checkpoint-<step>/ of a LoRA run)")
    parser.add_argument("--merge_model_path", required=True, help="output folder for the merged checkpoint")
    parser.add_argument("--device", default=None, help="cpu or gpu (default: gpu when available)")
    parser.add_argument("--dtype", default="bfloat16", help="storage dtype of the merged weights (default bfloat16)")
    return parser.parse_args(argv)


def merge(args: argparse.Namespace) -> str:
    """Load base + adapters, merge, save in the official layout; returns the output folder."""
    storage = DTYPES_BY_NAME.get(args.dtype.lower())
    if storage is None:
        raise ValueError(f"--dtype {args.dtype!r} is not supported; use bfloat16, float16 or float32")
    check_replaceable(os.path.abspath(args.merge_model_path))  # before the minutes of loading, not after
    for flag, source in (("--lora_path", args.lora_path), ("--model_path", args.model_path)):
        if os.path.exists(args.merge_model_path) and os.path.exists(source) \
                and os.path.samefile(args.merge_model_path, source):
            raise ValueError(f"--merge_model_path is the {flag} folder, which the merge would replace; "
                             "write the merged model to a new folder")
    if args.device:
        try:
            paddle.set_device(args.device)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"--device {args.device!r} is not available here ({err}); use cpu or gpu") from None
    # Full-precision matrices: the adapters are added to float32 weights, rounded once when saved.
    model = DeepseekVLV2ForCausalLM.from_pretrained(args.model_path, weight_dtype="float32")
    load_adapters(model, args.lora_path)
    merge_lora(model)
    model.save_pretrained(args.merge_model_path, dtype=storage, assets_from=args.model_path)
    logger.info("merged %s into %s -> %s", args.lora_path, args.model_path, args.merge_model_path)
    return args.merge_model_path


def merge_main(argv: Optional[Sequence[str]] = None) -> int:
    """``lora_merge.py``: returns the exit code."""
    args = parse_merge_args(argv)
    _configure_logging()
    return _run_reporting_errors(lambda: merge(args))


def _run_reporting_errors(job: Callable[[], object]) -> int:
    """Run ``job``: 0, or 2 with one ``error:`` line for bad input (the flags' own checks raise ValueError),
    or 130 on Ctrl-C (a checkpoint being written is left out whole, see ``output_folders``)."""

    def run_job() -> int:
        job()
        return 0

    return call_reporting_errors(run_job, lambda: (ValueError, *user_errors()))
