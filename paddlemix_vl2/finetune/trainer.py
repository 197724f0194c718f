"""The training loop: AdamW, gradient accumulation, clipping, warmup + cosine/linear/constant schedule,
loss logging, checkpoints every N steps and exact resume.

It trains any ``nn.Layer`` on a dataset of items that a collator turns into forward arguments, with a
loss function ``loss_fn(model, batch) -> scalar`` (by default the causal-LM loss of ``loss.py``): LoRA
adapters, chosen parts of a loaded checkpoint, or a model built from random initialisation.

Determinism: the records of optimizer step ``s`` are fixed by (seed, s): each epoch is one seeded
permutation, split into micro-batches of ``per_device_train_batch_size``, and step ``s`` takes
micro-batches ``s * accumulation .. s * accumulation + accumulation - 1``; the random generator (LoRA
dropout) is re-seeded with ``seed + s`` before the step. So resuming at a step needs only the weights,
the optimizer state and the step number (``state.py``), and it repeats the uninterrupted run exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import paddle
from paddle import nn

from ..output_folders import check_replaceable
from .files import atomic_directory, save_named_tensors
from .lora import LoRAConfig, save_adapters
from .loss import causal_lm_training_loss
from .optim import AdamW
from .parts import count_parameters, trainable_parameters
from .state import (
    CHECKPOINT_PREFIX, latest_checkpoint, load_checkpoint, remove_all_checkpoints, remove_old_checkpoints,
    save_checkpoint,
)

__all__ = ["LR_SCHEDULES", "TrainingConfig", "Trainer", "learning_rate_at"]

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("cosine", "linear", "constant")
# Settings that say where a run writes, not how it trains: a resume may change them without a warning.
_PLACEMENT_SETTINGS = ("output_dir", "overwrite_output_dir")
FINAL_DIR = "final"


@dataclasses.dataclass
class TrainingConfig:
    """Loop settings; names follow PaddleNLP's ``TrainingArguments``."""

    output_dir: str
    learning_rate: float = 1e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # <= 0: no clipping
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    logging_steps: int = 10
    save_steps: int = 500  # <= 0: no intermediate checkpoints
    save_total_limit: int = 0  # <= 0: keep every checkpoint
    seed: int = 42
    shuffle: bool = True
    # A fresh run deletes the checkpoints an earlier run left in output_dir (PaddleNLP's flag); without it,
    # such a folder is refused (check_output_dir).
    overwrite_output_dir: bool = False

    def __post_init__(self):
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise ValueError(
                f"--lr_scheduler_type {self.lr_scheduler_type!r} is not supported; use one of {', '.join(LR_SCHEDULES)}"
            )
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set --max_steps or a positive --num_train_epochs")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"--warmup_ratio is a fraction of the steps, from 0 to 1; got {self.warmup_ratio}")

    def check_output_dir(self, resuming: bool) -> None:
        """Raise ``FileExistsError`` when ``output_dir`` is a file, its ``final`` folder could not be replaced
        (``output_folders.check_replaceable``), or, for a fresh run without ``overwrite_output_dir``,
        ``output_dir`` already holds another run's checkpoints: rotation keeps the highest steps, so the
        fresh run would delete its own newest checkpoint and leave the older run's for a later resume to
        pick up."""
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise FileExistsError(f"--output_dir {self.output_dir} is a file; choose a folder")
        check_replaceable(os.path.join(self.output_dir, FINAL_DIR))  # now, not after the training
        fresh = not resuming and not self.overwrite_output_dir and os.path.isdir(self.output_dir)
        newest = latest_checkpoint(self.output_dir) if fresh else None
        if newest:
            raise FileExistsError(
                f"{self.output_dir} already holds checkpoints of another run ({os.path.basename(newest)}); "
                "continue it with --resume_from_checkpoint latest, replace them with --overwrite_output_dir, "
                "or choose a new --output_dir"
            )


def learning_rate_at(step: int, total_steps: int, config: TrainingConfig) -> float:
    """Learning rate of the 0-based optimizer step ``step``: linear warmup to ``learning_rate`` over the
    warmup steps, then cosine or linear decay towards 0 at ``total_steps`` (or constant)."""
    warmup = config.warmup_steps if config.warmup_steps > 0 else math.ceil(config.warmup_ratio * total_steps)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    if config.lr_scheduler_type == "constant":
        return config.learning_rate
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.lr_scheduler_type == "linear":
        return config.learning_rate * (1.0 - progress)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Train ``model`` on ``dataset`` (items -> ``collator`` -> forward keyword arguments).

    Args:
        model: the model, with the parts that should not train already frozen (``stop_gradient``).
        dataset: a sequence of items (``FinetuneDataset`` for fine-tuning).
        collator: a list of items -> a dict of forward arguments including ``labels``.
        config: the loop settings.
        lora_config: set when ``model`` carries LoRA adapters; checkpoints and the final output are then
            adapter folders.
        assets_from: a checkpoint folder whose processor/tokenizer files are copied into a full model's
            final output.
        loss_fn: ``(model, batch) -> scalar loss``.
    """

    def __init__(
        self,
        model: nn.Layer,
        dataset: Sequence[Any],
        collator: Callable[[List[Any]], Dict[str, paddle.Tensor]],
        config: TrainingConfig,
        lora_config: Optional[LoRAConfig] = None,
        assets_from: Optional[str] = None,
        loss_fn: Callable[[nn.Layer, Dict[str, paddle.Tensor]], paddle.Tensor] = causal_lm_training_loss,
    ):
        self.model = model
        self.dataset = dataset
        self.collator = collator
        self.config = config
        self.lora_config = lora_config
        self.assets_from = assets_from
        self.loss_fn = loss_fn
        self.world_size = paddle.distributed.get_world_size()
        self.rank = paddle.distributed.get_rank()
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("the model has no trainable parameter; unfreeze a part or apply LoRA")
        self.log_history: List[Dict[str, float]] = []
        self._epoch_orders: Dict[int, np.ndarray] = {}
        per_rank = len(dataset) // self.world_size
        if per_rank == 0:
            raise ValueError(f"the dataset has {len(dataset)} records, fewer than the {self.world_size} processes")
        self.micro_batches_per_epoch = math.ceil(per_rank / config.per_device_train_batch_size)

    @property
    def total_steps(self) -> int:
        if self.config.max_steps > 0:
            return self.config.max_steps
        micro_batches = self.config.num_train_epochs * self.micro_batches_per_epoch
        return max(1, math.ceil(micro_batches / self.config.gradient_accumulation_steps))

    def micro_batch_items(self, index: int) -> List[Any]:
        """The dataset items of this process's ``index``-th micro-batch (counted over all epochs)."""
        epoch, position = divmod(index, self.micro_batches_per_epoch)
        if epoch not in self._epoch_orders:
            n = len(self.dataset)
            if self.config.shuffle:
                order = np.random.default_rng([self.config.seed, epoch]).permutation(n)
            else:
                order = np.arange(n)
            per_rank = n // self.world_size
            self._epoch_orders = {epoch: order[: per_rank * self.world_size][self.rank::self.world_size]}
        size = self.config.per_device_train_batch_size
        return [self.dataset[int(i)] for i in self._epoch_orders[epoch][position * size:(position + 1) * size]]

    def _build_optimizer(self) -> AdamW:
        matrices = {name for name, param in self.params if param.ndim >= 2}
        return AdamW(
            self.params, beta1=self.config.adam_beta1, beta2=self.config.adam_beta2, epsilon=self.config.adam_epsilon,
            weight_decay=self.config.weight_decay, decays=lambda name: name in matrices,
        )

    def train(self, resume_from_checkpoint: Optional[str] = None) -> List[Dict[str, float]]:
        """Run to ``total_steps``; returns the per-step history (step, loss, learning_rate, grad_norm, seconds).

        ``resume_from_checkpoint``: a ``checkpoint-<step>`` folder, or ``"latest"`` for the newest in
        ``output_dir``. The training settings must be those of the interrupted run.
        """
        config, total = self.config, self.total_steps
        optimizer = self._build_optimizer()
        start = 0
        config.check_output_dir(resuming=bool(resume_from_checkpoint))
        if config.overwrite_output_dir and not resume_from_checkpoint and self.rank == 0:
            remove_all_checkpoints(config.output_dir)
        if resume_from_checkpoint:
            path = self._resolve_checkpoint(resume_from_checkpoint)
            state = load_checkpoint(path, self.model, optimizer, self.params, lora=self.lora_config is not None)
            start = int(state["global_step"])
            self.log_history = list(state.get("log_history", []))
            saved, current = state.get("training_config", {}), dataclasses.asdict(config)
            changed = sorted(k for k in current if k not in _PLACEMENT_SETTINGS and k in saved and saved[k] != current[k])
            if changed:
                logger.warning("resuming with changed settings %s: the run cannot repeat the interrupted one", changed)
            logger.info("resumed from %s at step %d", path, start)
        trainable, everything = count_parameters(self.model)
        logger.info(
            "training %d steps: %s of %s parameters train, %d records, batch %d x %d accumulation x %d processes",
            total, f"{trainable:,}", f"{everything:,}", len(self.dataset), config.per_device_train_batch_size,
            config.gradient_accumulation_steps, self.world_size,
        )
        model = self.model
        if self.world_size > 1:
            self._start_data_parallel()
        model.train()
        bar = _ProgressBar(total, start, enabled=self.rank == 0)
        for step in range(start, total):
            started = time.perf_counter()
            paddle.seed(config.seed + step)
            lr = learning_rate_at(step, total, config)
            losses = []
            for micro in range(config.gradient_accumulation_steps):
                batch = self.collator(self.micro_batch_items(step * config.gradient_accumulation_steps + micro))
                loss = self.loss_fn(model, batch)
                loss.backward()
                losses.append(float(loss))
            grad_norm = self._finish_gradients()
            if self.world_size > 1:
                losses = self._mean_over_processes(losses)
            if self.world_size > 1:
                optimizer.sync_touched()
            optimizer.step(lr)
            optimizer.clear_grad()
            record = {
                "step": step + 1, "loss": float(np.mean(losses)), "learning_rate": lr,
                "grad_norm": grad_norm, "seconds": time.perf_counter() - started,
            }
            self.log_history.append(record)
            bar.update(step + 1, record["loss"])
            if (step + 1) % config.logging_steps == 0 or step + 1 == total:
                logger.info(
                    "step %d/%d | loss %.4f | lr %.3e | grad_norm %.4f | %.2f s/step",
                    step + 1, total, record["loss"], lr, grad_norm, record["seconds"],
                )
            if config.save_steps > 0 and (step + 1) % config.save_steps == 0:
                self.save_checkpoint(optimizer, step + 1)
        bar.close()
        if self.rank == 0:
            self.save_final(os.path.join(config.output_dir, FINAL_DIR))
        return self.log_history

    def _finish_gradients(self) -> float:
        """Average the accumulated gradients (over micro-batches and processes), clip them to
        ``max_grad_norm``; returns the global norm.

        The gradients are averaged after the backward passes instead of scaling each loss: the MoE
        layers feed their aux loss into backward with gradient 1 whatever the loss scale, so scaling the
        loss would over-weight the aux loss by the accumulation count.
        """
        params = [param for _, param in self.params]
        if self.world_size > 1:
            self._sum_gradients_over_processes(params)
        scale = 1.0 / (self.config.gradient_accumulation_steps * self.world_size)
        if scale != 1.0:
            with paddle.no_grad():
                for param in params:
                    if param.grad is not None:
                        param.grad.scale_(scale)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        return float(paddle.nn.utils.clip_grad_norm_(params, max_norm))

    def _start_data_parallel(self) -> None:
        """Join the process group and give every process rank 0's weights (a head built at random on
        each process would otherwise differ)."""
        if not paddle.distributed.is_initialized():
            paddle.distributed.init_parallel_env()
        with paddle.no_grad():
            for _, param in self.params:
                paddle.distributed.broadcast(param, src=0)

    def _mean_over_processes(self, values: List[float]) -> List[float]:
        """Each process's micro-batch losses averaged over the processes (for the log)."""
        summed = paddle.to_tensor(values, dtype=paddle.float32)
        paddle.distributed.all_reduce(summed)
        return (summed / self.world_size).tolist()

    @staticmethod
    @paddle.no_grad()
    def _sum_gradients_over_processes(params: List[paddle.Tensor]) -> None:
        """Sum every gradient over the processes in one all-reduce of a flat float32 buffer.

        NOTE(port): not ``paddle.DataParallel``: its reducer counts each parameter once per backward and
        stops with "parameter ... has been ready before" on this model, whose MoE layers feed their aux
        loss into backward separately. A routed expert that got no token here has no gradient yet; it
        joins the sum as zeros (the optimizer's ``sync_touched`` then updates it everywhere or nowhere).
        """
        for param in params:
            if param.grad is None:
                param.grad = paddle.zeros_like(param)
        grads = [param.grad for param in params]
        flat = paddle.concat([grad.astype(paddle.float32).reshape([-1]) for grad in grads])
        paddle.distributed.all_reduce(flat)
        for grad, summed in zip(grads, paddle.split(flat, [int(grad.numel()) for grad in grads])):
            grad.set_value(summed.reshape(grad.shape).astype(grad.dtype))

    def _resolve_checkpoint(self, value: str) -> str:
        if value == "latest":
            path = latest_checkpoint(self.config.output_dir)
            if path is None:
                raise FileNotFoundError(
                    f"no finished {CHECKPOINT_PREFIX}* folder in {self.config.output_dir} to resume from"
                )
            return path
        return value

    def save_checkpoint(self, optimizer: AdamW, step: int) -> str:
        """Write ``output_dir/checkpoint-<step>`` (rank 0 only) and prune old ones; returns its path."""
        path = os.path.join(self.config.output_dir, f"{CHECKPOINT_PREFIX}{step}")
        if self.rank != 0:
            return path
        trainer_state = {
            "global_step": step,
            "log_history": self.log_history,
            "training_config": dataclasses.asdict(self.config),
            "lora_config": self.lora_config.to_dict() if self.lora_config else None,
        }
        save_checkpoint(path, self.model, optimizer, self.params, trainer_state, self.lora_config)
        remove_old_checkpoints(self.config.output_dir, self.config.save_total_limit)
        logger.info("saved %s", path)
        return path

    def save_final(self, directory: str) -> None:
        """Adapters alone (LoRA), the whole model in its ``save_pretrained`` layout (the official one for
        DeepSeek-VL2), or, for a model without ``save_pretrained``, its state as ``model.safetensors``."""
        if self.lora_config is not None:
            save_adapters(self.model, self.lora_config, directory)
        elif hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(directory, assets_from=self.assets_from)
        else:
            with atomic_directory(directory) as staging:
                save_named_tensors(self.model.state_dict(), os.path.join(staging, "model.safetensors"))
        logger.info("saved the trained %s to %s", "adapters" if self.lora_config else "model", directory)


class _ProgressBar:
    """A one-line progress bar with the last loss on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.perf_counter()
        self.first = start

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        done = int(30 * step / max(self.total, 1))
        rate = (time.perf_counter() - self.started) / max(step - self.first, 1)
        sys.stderr.write(
            f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{self.total} loss {loss:.4f} "
            f"{rate:.2f} s/step, {rate * (self.total - step):.0f} s left"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
