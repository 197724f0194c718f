"""A short full-parameter run of micro-tiny, for the data-parallel test: each process of a
``paddle.distributed.spawn`` (or the single process) calls ``train`` with the same arguments.

Two processes take records ``4s, 4s+2`` (rank 0) and ``4s+1, 4s+3`` (rank 1) at step ``s`` (no
shuffling; rank ``r`` reads every other record from ``r``). The single process sees the records in the
order ``0, 2, 1, 3, 4, 6, 5, 7, ...`` and accumulates two micro-batches of two, so each of its steps
averages the gradients of exactly the two micro-batches the two processes take: the runs must agree.
"""
import paddle

from conftest import checkpoint_dir
from paddlemix_vl2.finetune import (
    FinetuneCollator,
    Trainer,
    TrainingConfig,
    load_dataset,
    load_model_for_training,
    prepare_model,
)
from paddlemix_vl2.processors import DeepseekVLV2Processor

MICRO_BATCH = 2
STEPS = 3


def train(dataset_path: str, output_dir: str) -> None:
    """Train micro-tiny for STEPS steps of 2 x MICRO_BATCH records; rank 0 writes the trained weights in
    float32 to ``output_dir/float32`` (the trainer's own ``final`` copy is bf16)."""
    world_size = paddle.distributed.get_world_size()
    model = load_model_for_training(checkpoint_dir("micro-tiny"), progress=False)
    prepare_model(model)
    processor = DeepseekVLV2Processor.from_pretrained(checkpoint_dir("micro-tiny"), mask_prompt=True)
    dataset = load_dataset(dataset_path, processor, max_seq_length=4096)
    if world_size == 1:
        order = [4 * (i // 4) + (0, 2, 1, 3)[i % 4] for i in range(len(dataset))]
        dataset = [dataset[i] for i in order]
    config = TrainingConfig(
        output_dir=output_dir, learning_rate=1e-3, max_steps=STEPS, per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=2 // world_size, warmup_steps=0, lr_scheduler_type="constant",
        save_steps=0, seed=5, shuffle=False,
    )
    Trainer(model, dataset, FinetuneCollator(processor), config).train()
    if paddle.distributed.get_rank() == 0:
        model.save_pretrained(f"{output_dir}/float32", dtype=paddle.float32)
