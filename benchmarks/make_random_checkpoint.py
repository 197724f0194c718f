"""Write a random-weight DeepSeek-VL2 checkpoint in the official Hugging Face layout.

The folder holds what the official repositories ship: a sparse ``config.json``, ``processor_config.json``,
the tokenizer files, bf16 ``model-XXXXX-of-XXXXXX.safetensors`` shards and ``model.safetensors.index.json``.
Parameter names and shapes are the official state_dict ones (torch Linear weights are ``[out, in]``),
including the unused ``vision.attn_pool.*`` tensors, so loaders and benchmarks see exactly what the real
download would give them, with random values.

Weights are N(0, 0.02), norm weights 1 and biases 0, drawn per tensor from a seeded generator. Tensors are
generated and written in chunks, so peak memory stays in the tens of MB whatever the checkpoint size. The
folder is built under a temporary name next to the target and renamed at the end: an interrupted run never
leaves a half-written checkpoint at the target path.

Usage::

    python benchmarks/make_random_checkpoint.py --arch tiny --out /tmp/bench-ckpt/tiny
    python benchmarks/make_random_checkpoint.py --arch small --layers 4 --out /tmp/bench-ckpt/small4
    python benchmarks/make_random_checkpoint.py --arch tiny --out /tmp/x --dry_run   # count only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

import numpy as np

# Benchmarks run as scripts, so their folder is on sys.path and siblings import by bare name.
from checkpoint_layout import (
    ARCHITECTURES,
    BF16_BYTES,
    Init,
    ModelSpec,
    TensorSpec,
    official_config,
    parameter_count,
    tensor_specs,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"
REAL_TOKENIZER_DIR = FIXTURES_DIR / "tokenizer-vl2"
MICRO_CHECKPOINT_DIR = FIXTURES_DIR / "checkpoints" / "micro-tiny"
PROCESSOR_CONFIG_PATH = MICRO_CHECKPOINT_DIR / "processor_config.json"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INDEX_FILE_NAME = "model.safetensors.index.json"
BF16_ONE_BITS = 0x3F80
INIT_STD = 0.02
DEFAULT_CHUNK_ELEMENTS = 1 << 22
DEFAULT_MAX_SHARD_SIZE = "2GB"
# Room left on the disk on top of the checkpoint itself, so the run never fills the disk completely.
DISK_HEADROOM_BYTES = 1 << 30


def parse_size(text: str) -> int:
    """'2GB' -> 2*10**9, '500MiB' -> 500*2**20, '123' -> 123 bytes (decimal units as transformers uses)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"cannot read size {text!r}; write it like 2GB, 500MB, 1GiB or a number of bytes")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        return int(number)
    base = 1024 if unit.endswith("IB") else 1000
    return int(number * base ** powers[unit[0]])


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """One shard file and the tensors it holds (in state_dict order)."""

    file_name: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)


def plan_shards(tensors: Sequence[TensorSpec], max_shard_bytes: int) -> list[ShardPlan]:
    """Fill shards in order up to max_shard_bytes, as transformers does; a bigger tensor gets its own shard.

    File names follow the official 5-digit index and 6-digit total: model-00001-of-000004.safetensors.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_bytes} bytes")
    groups: list[list[TensorSpec]] = [[]]
    group_bytes = 0
    for tensor in tensors:
        if groups[-1] and group_bytes + tensor.nbytes > max_shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(tensor)
        group_bytes += tensor.nbytes
    total = len(groups)
    return [
        ShardPlan(f"model-{number:05d}-of-{total:06d}.safetensors", tuple(group))
        for number, group in enumerate(groups, start=1)
    ]


def safetensors_header(tensors: Iterable[TensorSpec]) -> bytes:
    """The length-prefixed JSON header of a bf16 safetensors file whose data is laid out in name order.

    Returns the 8-byte little-endian header length followed by the JSON, space-padded to a multiple of 8.
    """
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in sorted(tensors, key=lambda item: item.name):
        entries[tensor.name] = {
            "dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def float32_to_bfloat16_bits(
    values: np.ndarray, out: np.ndarray | None = None, scratch: np.ndarray | None = None
) -> np.ndarray:
    """Round finite float32 values [n] to bfloat16 (nearest, ties to even); returns the bits as uint16 [n].

    ``values`` is left unchanged; ``out`` (uint16 [n]) and ``scratch`` (uint32 [n]) are reused when given.
    """
    bits = values.view(np.uint32)
    if scratch is None:
        scratch = np.empty(bits.shape, np.uint32)
    if out is None:
        out = np.empty(bits.shape, np.uint16)
    # Adding 0x7FFF plus the lowest kept bit rounds half-way cases to the even neighbour.
    np.right_shift(bits, 16, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)
    scratch += 0x7FFF
    np.add(bits, scratch, out=scratch)
    np.right_shift(scratch, 16, out=scratch)
    np.copyto(out, scratch, casting="unsafe")
    return out


class _ChunkBuffers:
    """Preallocated float32 / uint32 / uint16 buffers, so generating a tensor allocates nothing."""

    def __init__(self, chunk_elements: int):
        self.values = np.empty(chunk_elements, np.float32)
        self.scratch = np.empty(chunk_elements, np.uint32)
        self.bits = np.empty(chunk_elements, np.uint16)


def _write_tensor_data(
    file: BinaryIO, tensor: TensorSpec, rng: np.random.Generator, buffers: _ChunkBuffers
) -> None:
    """Stream one tensor's bf16 bytes into ``file``, chunk by chunk."""
    remaining = tensor.numel
    chunk_elements = buffers.bits.size
    while remaining:
        count = min(remaining, chunk_elements)
        bits = buffers.bits[:count]
        if tensor.init is Init.NORMAL:
            values = buffers.values[:count]
            rng.standard_normal(out=values, dtype=np.float32)
            values *= np.float32(INIT_STD)
            float32_to_bfloat16_bits(values, out=bits, scratch=buffers.scratch[:count])
        else:
            bits.fill(BF16_ONE_BITS if tensor.init is Init.ONES else 0)
        file.write(memoryview(bits).cast("B"))
        remaining -= count


def _write_shard(
    path: Path, shard: ShardPlan, seeds: dict[str, int], seed: int, buffers: _ChunkBuffers
) -> None:
    with open(path, "wb") as file:
        file.write(safetensors_header(shard.tensors))
        for tensor in sorted(shard.tensors, key=lambda item: item.name):
            # One generator per tensor: values do not depend on the shard size or the chunk size.
            rng = np.random.default_rng([seed, seeds[tensor.name]])
            _write_tensor_data(file, tensor, rng, buffers)


def _write_json(path: Path, content: dict) -> None:
    text = json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class CheckpointReport:
    """What write_checkpoint produced."""

    out_dir: Path
    parameter_count: int
    total_bytes: int
    shard_files: tuple[str, ...]
    seconds: float


def write_checkpoint(
    config: dict,
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_shard_bytes: int = parse_size(DEFAULT_MAX_SHARD_SIZE),
    tokenizer_dir: str | Path = REAL_TOKENIZER_DIR,
    processor_config_path: str | Path = PROCESSOR_CONFIG_PATH,
    overwrite: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> CheckpointReport:
    """Write a random bf16 checkpoint for ``config`` (a config.json dict) into ``out_dir``, atomically.

    Everything goes into a hidden temporary folder next to ``out_dir`` that is renamed into place at the
    end and removed on any failure or interrupt.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    tokenizer_dir, processor_config_path = Path(tokenizer_dir), Path(processor_config_path)
    tensors = tensor_specs(ModelSpec.from_config(config))
    shards = plan_shards(tensors, max_shard_bytes)
    total_bytes = sum(shard.nbytes for shard in shards)

    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass overwrite=True (--overwrite)")
    for source in [processor_config_path, *(tokenizer_dir / name for name in TOKENIZER_FILES)]:
        if not source.is_file():
            raise FileNotFoundError(
                f"{source} is missing; point tokenizer_dir / processor_config_path at existing files"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    free_bytes = shutil.disk_usage(out_dir.parent).free
    if free_bytes < total_bytes + DISK_HEADROOM_BYTES:
        raise OSError(
            f"{out_dir.parent} has {free_bytes / 1e9:.1f} GB free but the checkpoint needs "
            f"{total_bytes / 1e9:.1f} GB plus 1 GiB headroom; free space or choose another --out"
        )

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        # mkdtemp makes the folder private (0700); the checkpoint should be readable like any other folder.
        staging.chmod(0o755)
        _write_json(staging / "config.json", config)
        shutil.copyfile(processor_config_path, staging / "processor_config.json")
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, staging / name)
        seeds = {tensor.name: index for index, tensor in enumerate(tensors)}
        buffers = _ChunkBuffers(chunk_elements)
        for shard in shards:
            _write_shard(staging / shard.file_name, shard, seeds, seed, buffers)
        weight_map = {tensor.name: shard.file_name for shard in shards for tensor in shard.tensors}
        _write_json(
            staging / INDEX_FILE_NAME,
            {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
        )
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CheckpointReport(
        out_dir=out_dir,
        parameter_count=sum(tensor.numel for tensor in tensors),
        total_bytes=total_bytes,
        shard_files=tuple(shard.file_name for shard in shards),
        seconds=time.perf_counter() - start,
    )


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished folder to out_dir; an existing out_dir is set aside first and deleted last."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    retired.rmdir()
    out_dir.rename(retired)
    staging.rename(out_dir)
    shutil.rmtree(retired, ignore_errors=True)


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write a random-weight DeepSeek-VL2 checkpoint (bf16 safetensors, official HF layout).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "architectures:\n"
            "  micro  the micro-tiny test sizes (hidden 64, 3 layers) with the micro fixture's\n"
            "         1024-id tokenizer\n"
            "  tiny   DeepSeek-VL2-tiny: 3.37B parameters, 6.7 GB\n"
            "  small  DeepSeek-VL2-small widths (MLA, vocab 102400). config.json says bos 100000 /\n"
            "         eos 100001 as the official file does, but the tokenizer files are the\n"
            "         129,280-vocabulary fixture ones (bos 0, <image> 128815), because the small\n"
            "         tokenizer is not in this repo. Its ids above 102399 do not fit the embedding,\n"
            "         so feed synthetic ids when benchmarking.\n"
            "  full   DeepSeek-VL2 (27B) widths: MLA, 72 experts, noaux_tc sigmoid routing\n"
            "Use --layers to shrink small/full to a size that fits in memory."
        ),
    )
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES)
    parser.add_argument("--out", required=True, type=Path,
                        help="target folder (must not exist unless --overwrite)")
    parser.add_argument("--layers", type=int, default=None, help="override language_config.num_hidden_layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="e.g. 2GB, 500MB, 1GiB (default 2GB)")
    parser.add_argument("--tokenizer_dir", type=Path, default=None,
                        help="folder with tokenizer.json, tokenizer_config.json, special_tokens_map.json "
                             "(default: tests/fixtures/tokenizer-vl2; micro: the micro-tiny fixture)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the parameter count and shard plan, write nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    config = official_config(args.arch, args.layers)
    spec = ModelSpec.from_config(config)
    count = parameter_count(spec)
    print(f"arch {args.arch}: {spec.language.num_hidden_layers} LM layers, {count:,} parameters, "
          f"{count * BF16_BYTES / 1e9:.2f} GB in bf16")
    if args.dry_run:
        for shard in plan_shards(tensor_specs(spec), parse_size(args.max_shard_size)):
            print(f"  {shard.file_name}: {len(shard.tensors)} tensors, {shard.nbytes / 1e9:.3f} GB")
        return
    tokenizer_dir = args.tokenizer_dir
    if tokenizer_dir is None:
        tokenizer_dir = MICRO_CHECKPOINT_DIR if args.arch == "micro" else REAL_TOKENIZER_DIR
    report = write_checkpoint(
        config, args.out, seed=args.seed, max_shard_bytes=parse_size(args.max_shard_size),
        tokenizer_dir=tokenizer_dir, overwrite=args.overwrite,
    )
    print(f"wrote {report.out_dir}: {len(report.shard_files)} shard(s), {report.total_bytes / 1e9:.2f} GB "
          f"in {report.seconds:.1f} s ({report.total_bytes / 1e6 / max(report.seconds, 1e-9):.0f} MB/s), "
          f"peak RSS {_peak_rss_bytes() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
