"""Time DeepSeek-VL2 inference stage by stage and put every figure next to this machine's limit.

One process measures, on one checkpoint folder:

* load: wall time and peak RSS of ``DeepseekVLV2ForCausalLM.from_pretrained``, against the time to read
  the shard files and the fp32 weights + 1 GiB;
* one 640×480 image (5 tiles): processor, vision + projector, LM prefill (lm_head on the last position),
  time to first token, then 64 greedy decode steps;
* three 640×480 images (no tiling, 6 tiles): the same;
* a batch of 4 one-image prompts: aggregate decode tokens/s;
* MLA checkpoints only: decode step time at a 256- and a 2048-token context, and KV-cache bytes per token.

Prefill stages are reported as achieved GFLOP/s over the measured fp32 matmul rate (Paddle's, the issue's
limit, and the best measured: Paddle's or the package's GEMM), decode as bytes of weights read per step ×
steps/s over the measured memory bandwidth; the FLOPs and bytes come from the config (``model_costs``).
The full ``roofline.measure`` runs once after loading (load runs first, so its
peak RSS is not inflated by the roofline's buffers), and each stage is also bracketed by quick probes of
the same measurements (``LimitProbe``): on a shared machine a stage's ratio is taken against the capacity
the machine had around it. Decode steps are also interleaved with single bandwidth probes (every
``IN_TURN_PROBE_EVERY`` rounds of steps, untimed), since this host's bandwidth drifts by a third within
seconds: the decode ratios are also given over the medians of those, Paddle's and the package GEMV's,
and over the rate of the last step's own matrices streamed where they are stored (``step_weights``).
Each of those probes is one timed run after an untimed one, and the round of steps after it is untimed
too: this host reads memory left idle for a moment at a quarter to a half of its warm rate, so a cold
probe understated the bandwidth and the steps after a probe (1.4-1.6x the median) measured the probe.
The roofline and the probes share one set of operands, held for the whole run (``roofline.Operands``
says why). Each section records the 1-minute load average too.

Usage::

    python benchmarks/bench_infer.py --checkpoint /tmp/bench-ckpt/tiny --json /tmp/bench-tiny.json
    python benchmarks/bench_infer.py --checkpoint tests/fixtures/checkpoints/micro-small --quick
    python benchmarks/bench_infer.py --checkpoint /tmp/bench-ckpt/tiny --profile /tmp/prof  # + cProfile

A checkpoint whose tokenizer produces ids beyond its LM vocabulary (the random ``small`` checkpoint ships
the 129k tokenizer with a 102400 vocabulary) is driven with the prompt ids wrapped into the vocabulary:
the shapes and the image positions are those of the real prompt, the text ids are synthetic.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import json
import os
import pstats
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

# roofline sets the thread and MKL variables before Paddle is imported.
import roofline  # noqa: I001
import model_costs
import step_weights

import numpy as np
import paddle
from PIL import Image

from paddlemix_vl2.generation import decode_one_token, prefill
from paddlemix_vl2.models.deepseek_vl2 import DeepseekVLV2ForCausalLM
from paddlemix_vl2.processors import DeepseekVLV2Processor
from paddlemix_vl2.sampling import SamplingParams, sample_next_token

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = REPO_ROOT / "tests" / "fixtures" / "images" / "scene_640x480.png"
GIB = 1 << 30
GREEDY = SamplingParams()
PROBE_REPEATS = 3
# Decode steps (of every stream) between two single bandwidth probes taken in turn with the steps.
IN_TURN_PROBE_EVERY = 4


def settling_rounds(steps: int, every: int = IN_TURN_PROBE_EVERY) -> int:
    """Untimed rounds ``decode_in_turn`` adds to ``steps`` timed ones: one after each probe but the last."""
    if every < 1:
        raise ValueError(f"probes every {every} rounds: give at least 1")
    return max(0, (steps - 1) // every)


def rounds_with_settling(steps: int, every: int = IN_TURN_PROBE_EVERY) -> int:
    """Steps ``decode_in_turn`` takes per stream for ``steps`` timed ones with probes: the room a cache needs."""
    return steps + settling_rounds(steps, every)


def mean_context(prompt_len: int, steps: int) -> int:
    """The mean number of cached positions over a section's timed steps (settling ones among them)."""
    return prompt_len + rounds_with_settling(steps) // 2


# With the real 129k tokenizer these give the prompt lengths: 1037 tokens for one image
# (global view + 2×2 tiles), 1279 for three (each a global view + one tile).
ONE_IMAGE_QUESTION = "<image>\nDescribe each shape in this image."
THREE_IMAGE_QUESTION = "<image>\n<image>\n<image>\nDescribe each of these three images."
BATCH_QUESTIONS = (
    ONE_IMAGE_QUESTION,
    "<image>\nWhat shapes are in this image?",
    "<image>\nDescribe the objects in this image.",
    "<image>\nWhich colours do you see in this picture?",
)


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    decode_tokens: int = 64
    mla_contexts: tuple = (256, 2048)
    mla_decode_steps: int = 32
    # Long synthetic MLA prompts are prefilled in chunks to bound activation memory.
    prefill_chunk: int = 512
    roofline_quick: bool = False


FULL_SETTINGS = BenchSettings()
# Same code paths at sizes that finish in seconds on the micro fixtures.
QUICK_SETTINGS = BenchSettings(decode_tokens=4, mla_contexts=(16, 64), mla_decode_steps=3, roofline_quick=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mapped_huge_page_fraction(checkpoint: Path) -> Optional[float]:
    """Of the checkpoint's shard pages mapped in this process (the bf16 matrices a load maps), the share
    mapped as 2 MiB pages (``FilePmdMapped`` over ``Rss`` in ``/proc/self/smaps``); None without mapped
    shards or without Linux's smaps.

    Why: a decode step streams the mapped matrices, and how fast depends on how the page cache holds the
    shards. Files read into the cache whole come in 2 MiB folios; pages the kernel reclaimed and read again
    (a DAMON pageout scheme on an idle guest does this) come back in small ones: on the Intel benchmark
    machine a 331 MB bf16 matrix (the tiny lm_head) mapped from small folios streamed at 18.9 GB/s against
    27.7 from 2 MiB ones (one process, in turn; benchmarks/HISTORY.md)."""
    shards = {str(path.resolve()) for path in checkpoint.glob("*.safetensors")}
    totals, current = {"Rss:": 0, "FilePmdMapped:": 0}, False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                fields = line.split(None, 5)  # a header's sixth field is the path, spaces and all
                if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                    current = len(fields) == 6 and fields[5].rstrip("\n").removesuffix(" (deleted)") in shards
                elif current and fields and fields[0] in totals:
                    totals[fields[0]] += int(fields[1])
    except OSError:
        return None
    return totals["FilePmdMapped:"] / totals["Rss:"] if totals["Rss:"] else None


class Profiler:
    """cProfile per named stage when an output folder is given, otherwise a no-op.

    Each stage writes ``<folder>/<stage>.prof`` and ``<stage>.txt`` (the top functions by own time).
    """

    def __init__(self, folder: Optional[Path], top: int = 25):
        self.folder, self.top = folder, top
        self._active: Optional[cProfile.Profile] = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.folder is None:
            yield
            return
        profile = self._active = cProfile.Profile()
        profile.enable()
        try:
            yield
        finally:
            profile.disable()
            self._active = None
            profile.dump_stats(self.folder / f"{name}.prof")
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(self.top)
            (self.folder / f"{name}.txt").write_text(text.getvalue(), encoding="utf-8")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave what runs inside out of the current stage's profile (the probes taken between steps)."""
        if self._active is None:
            yield
            return
        self._active.disable()
        try:
            yield
        finally:
            self._active.enable()


@dataclasses.dataclass
class Limit:
    """A machine limit measured around one stage (filled in when the stage ends)."""

    value: float = float("nan")


class LimitProbe:
    """Quick roofline measurements taken right before and right after a stage.

    ``roofline.measure`` runs once, after loading; on a shared machine the capacity a stage actually
    gets can differ from it several-fold, so every ratio uses the better of a probe just before and just
    after its own stage (the same roofline functions, best of ``PROBE_REPEATS`` timed runs), like the
    roofline, which also reports its best run.
    """

    def __init__(self, sizes: roofline.RooflineSizes):
        self.sizes = sizes
        self.operands = roofline.Operands(keep=True)  # freed probe buffers would slow the next stage

    def vision_matmul_gflops(self) -> float:
        return roofline.matmul_gflops(self.sizes.vit_fc1_matmul, PROBE_REPEATS, 1, self.operands).best

    def lm_matmul_gflops(self) -> float:
        return roofline.matmul_gflops(self.sizes.square_matmul, PROBE_REPEATS, 1, self.operands).best

    def vision_gemm_gflops(self) -> float:
        """The package's GEMM at the vision probe's shape (NaN where it does not run)."""
        rate = roofline.package_gemm_gflops(self.sizes.vit_fc1_matmul, PROBE_REPEATS, 1, self.operands)
        return _best_or_nan(rate)

    def lm_gemm_gflops(self) -> float:
        rate = roofline.package_gemm_gflops(self.sizes.square_matmul, PROBE_REPEATS, 1, self.operands)
        return _best_or_nan(rate)

    def bandwidth_gbs(self, repeats: int = PROBE_REPEATS, warmup: int = 1) -> float:
        """Decode reads each weight once; the better of Paddle's two streaming measurements is the limit."""
        read = roofline.read_bandwidth_gbs(self.sizes.read_bytes, repeats, warmup, self.operands).best
        return max(read, roofline.gemv_bandwidth_gbs(self.sizes.gemv_k_n, repeats, warmup, self.operands).best)

    def package_gemv_gbs(self, repeats: int = PROBE_REPEATS, warmup: int = 1) -> float:
        """The package's decode GEMV on the same weight (NaN where it does not run)."""
        rate = roofline.package_gemv_bandwidth_gbs(self.sizes.gemv_k_n, repeats, warmup, self.operands)
        return _best_or_nan(rate)

    def bandwidths_once(self) -> Tuple[float, float]:
        """(Paddle's limit, the package GEMV's rate) from one timed run each after an untimed one, for
        probes taken between steps (a cold single run read idle memory, slow on this host)."""
        return self.bandwidth_gbs(repeats=1, warmup=1), self.package_gemv_gbs(repeats=1, warmup=1)

    @contextlib.contextmanager
    def around(self, measure: Callable[[], float]) -> Iterator[Limit]:
        limit = Limit()
        before = measure()
        yield limit
        limit.value = max(before, measure())


def _best_or_nan(rate: Optional[roofline.Rate]) -> float:
    return float("nan") if rate is None else rate.best


def read_files(checkpoint: Path) -> Dict[str, float]:
    """Bytes and wall seconds to read every shard once into a reused buffer (the floor for loading)."""
    buffer = memoryview(bytearray(64 << 20))
    total, start = 0, time.perf_counter()
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as f:
            while True:
                count = f.readinto(buffer)
                if not count:
                    break
                total += count
    return {"file_bytes": total, "file_read_seconds": time.perf_counter() - start}


def bench_load(checkpoint: Path, profiler: Profiler, weight_dtype: str, map_weights: bool):
    """Load the model; returns (model, the load section of the report)."""
    section = {"load_average_1min": load_average(), **read_files(checkpoint), "weight_dtype": weight_dtype,
               "map_weights": map_weights}
    start = time.perf_counter()
    with profiler.stage("load"):
        model = DeepseekVLV2ForCausalLM.from_pretrained(
            str(checkpoint), weight_dtype=weight_dtype, map_weights=map_weights
        )
    section["seconds"] = time.perf_counter() - start
    section["peak_rss_bytes"] = peak_rss_bytes()
    section["mapped_huge_page_fraction"] = mapped_huge_page_fraction(checkpoint)
    section["matrix_dtype"] = str(model.language.lm_head.weight.dtype).replace("paddle.", "")
    section["stored_weight_bytes"] = sum(int(np.prod(p.shape)) * p.element_size() for p in model.parameters())
    weight_bytes = sum(int(np.prod(p.shape)) for p in model.parameters()) * model_costs.FP32_BYTES
    section["fp32_weight_bytes"] = weight_bytes
    section["rss_limit_bytes"] = weight_bytes + GIB
    section["rss_ratio"] = section["peak_rss_bytes"] / section["rss_limit_bytes"]
    section["time_ratio"] = section["seconds"] / section["file_read_seconds"]
    return model, section


def conversation(question: str) -> List[dict]:
    return [{"role": "<|User|>", "content": question}, {"role": "<|Assistant|>", "content": ""}]


def lm_input_ids(ids: paddle.Tensor, vocab_size: int):
    """(ids the LM can embed, whether they had to be made synthetic); see the module docstring."""
    if int(ids.max()) < vocab_size:
        return ids, False
    return ids % vocab_size, True


def timed_step(lm, token: paddle.Tensor, cache, positions: paddle.Tensor):
    """One greedy decode step: (next token [B], wall seconds)."""
    start = time.perf_counter()
    token = sample_next_token(decode_one_token(lm, token, cache, positions), GREEDY)
    return token, time.perf_counter() - start


def decode_in_turn(lm, streams: Sequence[tuple], steps: int, between: Optional[Callable[[], None]] = None,
                   every: int = IN_TURN_PROBE_EVERY) -> List[tuple]:
    """Greedy-decode ``steps`` timed tokens for each (token, cache, positions) stream, one step of each in
    turn, so a host that drifts between fast and slow phases touches every stream alike. ``between``
    (untimed) runs after every ``every`` rounds of steps and after the last; the round after it is untimed
    (``settling_rounds``: each cache needs room for those steps too), since on this host it pays for the
    memory ``between`` read.

    Returns per stream (seconds per timed step, distinct experts per timed step and MoE layer).
    """
    streams = list(streams)
    needed = rounds_with_settling(steps, every) if between is not None else steps
    for _, cache, _ in streams:
        if cache.max_length - cache.length < needed:
            raise ValueError(f"a cache with room for {cache.max_length - cache.length} new tokens cannot take {needed} "
                             "steps (timed and settling): prefill with room for rounds_with_settling(steps)")
    seconds = [[] for _ in streams]
    spans = [[] for _ in streams]  # per timed step, its entries of the stream's routing record
    for _, cache, _ in streams:
        cache.routing = []

    def one_round(timed: bool) -> None:
        for i, (token, cache, positions) in enumerate(streams):
            first = len(cache.routing)
            token, elapsed = timed_step(lm, token, cache, positions)
            if timed:
                seconds[i].append(elapsed)
                spans[i].append((first, len(cache.routing)))
            streams[i] = (token, cache, positions + 1)

    for step in range(steps):
        one_round(timed=True)
        if between is not None and ((step + 1) % every == 0 or step + 1 == steps):
            between()
            if step + 1 < steps:
                one_round(timed=False)
    experts = [
        [[len(np.unique(topk_idx)) for topk_idx in cache.routing[a:b]] for a, b in stream_spans]
        for (_, cache, _), stream_spans in zip(streams, spans)
    ]
    return list(zip(seconds, experts))


def decode_report(lm, generation: dict, batch: int, context: int) -> dict:
    """Decode rates of ``run_generation``'s timed steps and the bandwidth ratio: weight bytes per step ×
    steps/s over its ``bandwidth_gbs``, the best of Paddle's probes around the stage. Then the same over the
    medians of the single probes taken in turn with the steps (``in_turn_probes``: (Paddle's limit, the
    package GEMV's rate) each), the bandwidth of the moments the steps ran in: over Paddle's (the issue's
    limit), and over the better of the two. Last over the best rate of the last step's matrices streamed
    where they are stored (``step_weights``; NaN where the kernel does not run)."""
    seconds, experts, in_turn = generation["step_seconds"], generation["experts"], generation["in_turn_probes"]
    bandwidth_gbs, in_place = generation["bandwidth_gbs"], generation["step_matrices_rate"]
    config = lm.config
    matrix_bytes = lm.lm_head.weight.element_size()
    weight_bytes = statistics.mean(
        model_costs.decode_weight_bytes(config, per_layer, matrix_bytes) for per_layer in experts
    )
    median, total = statistics.median(seconds), sum(seconds)
    achieved_gbs = weight_bytes * len(seconds) / total / 1e9
    paddle_in_turn = statistics.median(limit for limit, _ in in_turn)
    best_in_turn = statistics.median(max(limit, np.nan_to_num(package)) for limit, package in in_turn)
    in_place_gbs = _best_or_nan(in_place)
    return {
        "steps": len(seconds),
        "batch": batch,
        "median_step_seconds": median,
        "max_step_seconds": max(seconds),
        "max_over_median": max(seconds) / median,
        "step_seconds": list(seconds),  # in order: slow phases on a shared host show as runs of slow steps
        "tokens_per_second_median_step": batch / median,
        "tokens_per_second_all_steps": batch * len(seconds) / total,
        "weight_bytes_per_step": weight_bytes,
        "kv_cache_bytes_read_per_step": model_costs.kv_cache_bytes_read(config, context, batch),
        "achieved_weight_gbs": achieved_gbs,
        "bandwidth_gbs": bandwidth_gbs,
        "bandwidth_ratio": achieved_gbs / bandwidth_gbs,
        "bandwidth_in_turn_gbs": paddle_in_turn,
        "best_bandwidth_in_turn_gbs": best_in_turn,
        "bandwidth_in_turn_probes": [list(probe) for probe in in_turn],
        "bandwidth_ratio_in_turn": achieved_gbs / paddle_in_turn,
        "best_bandwidth_ratio_in_turn": achieved_gbs / best_in_turn,
        "step_matrices_gbs": in_place_gbs,
        "step_matrices_ratio": achieved_gbs / in_place_gbs,
        "tokens_per_second_limit": batch * bandwidth_gbs * 1e9 / weight_bytes,
    }


def prefilled(lm, embeds: paddle.Tensor, attention_mask: paddle.Tensor, new_tokens: int,
              chunk_size: int = 0) -> tuple:
    """Prefill a prompt into a new cache with room for ``new_tokens``: ((first token, cache, positions),
    seconds of the prefill, seconds of the prefill and the first token). The cache is made untimed."""
    mask = attention_mask.astype(paddle.bool)
    cache = lm.new_cache(embeds.shape[0], embeds.shape[1] + new_tokens + 1)
    start = time.perf_counter()
    logits = prefill(lm, embeds, mask, cache, chunk_size=chunk_size)
    prefill_seconds = time.perf_counter() - start
    token = sample_next_token(logits, GREEDY)
    first_token_seconds = time.perf_counter() - start
    return (token, cache, mask.astype(paddle.int64).sum(axis=1)), prefill_seconds, first_token_seconds


def run_generation(lm, embeds: paddle.Tensor, attention_mask: paddle.Tensor, new_tokens: int,
                   profiler: Profiler, probe: LimitProbe, label: str, alongside: Optional[tuple] = None) -> dict:
    """Prefill, first token, then ``new_tokens`` decode steps, each stage timed. The probes bracket the
    two stages together, so the first decode step follows the prefill as it does in use (a bandwidth probe
    between them slowed that step on the Intel guest, whose memory is slow to read after sitting idle).
    ``alongside``: another prefilled stream, decoded in turn with this one (its step seconds returned as
    ``alongside_step_seconds``; the decode profile then covers both)."""
    in_turn = []

    def probe_between_steps() -> None:
        with profiler.paused():
            in_turn.append(probe.bandwidths_once())

    with probe.around(probe.bandwidth_gbs) as bandwidth, probe.around(probe.lm_matmul_gflops) as prefill_limit, \
            probe.around(probe.lm_gemm_gflops) as gemm_limit:
        with profiler.stage(f"{label}_prefill"):
            stream, prefill_seconds, first_token_seconds = prefilled(
                lm, embeds, attention_mask, rounds_with_settling(new_tokens))
        with profiler.stage(f"{label}_decode"):
            decoded = decode_in_turn(lm, [stream] if alongside is None else [stream, alongside], new_tokens,
                                     between=probe_between_steps)
    (seconds, experts), *others = decoded
    parts = step_weights.step_parts(lm, step_weights.last_step_routing(lm.config, stream[1].routing))
    return {"step_matrices_rate": step_weights.stream_gbs(parts),
            "prefill_seconds": prefill_seconds, "prefill_and_first_token_seconds": first_token_seconds,
            "prefill_limit_gflops": prefill_limit.value, "prefill_gemm_limit_gflops": gemm_limit.value,
            "step_seconds": seconds, "experts": experts, "bandwidth_gbs": bandwidth.value,
            "in_turn_probes": in_turn, "alongside_step_seconds": [other[0] for other in others]}


def time_processor(processor, question: str, images: Sequence[Image.Image], repeats: int = 3):
    """(median seconds of the processor call, its output)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        inputs = processor(conversations=conversation(question), images=list(images))
        times.append(time.perf_counter() - start)
    return statistics.median(times), inputs


def bench_prompt(model, processor, images, question, settings: BenchSettings, probe: LimitProbe,
                 profiler: Profiler, label: str):
    """One prompt through the whole pipeline; returns (report section, its inputs_embeds)."""
    lm, config = model.language, model.config
    section = {"load_average_1min": load_average(), "images": len(images)}
    section["processor_seconds"], inputs = time_processor(processor, question, images)
    input_ids, section["synthetic_text_ids"] = lm_input_ids(inputs.input_ids, lm.config.vocab_size)
    num_tiles = int(sum(w * h + 1 for w, h in inputs.images_spatial_crop.numpy().reshape(-1, 2) if w))
    prompt_len = int(input_ids.shape[1])
    section.update(prompt_tokens=prompt_len, tiles=num_tiles)
    with paddle.no_grad():
        with probe.around(probe.vision_matmul_gflops) as vision_limit, \
                probe.around(probe.vision_gemm_gflops) as vision_gemm_limit, profiler.stage(f"{label}_vision"):
            start = time.perf_counter()
            embeds = model.prepare_inputs_embeds(
                input_ids, inputs.images, inputs.images_seq_mask, inputs.images_spatial_crop
            )
            section["vision_seconds"] = time.perf_counter() - start
        generation = run_generation(
            lm, embeds, inputs.attention_mask, settings.decode_tokens, profiler, probe, label
        )
    vision_flops = model_costs.vision_flops(config.vision_config, config.projector_config, num_tiles)
    prefill_flops = model_costs.lm_prefill_flops(lm.config, [prompt_len])
    section.update(
        vision_gflop=vision_flops / 1e9,
        vision_gflops=vision_flops / 1e9 / section["vision_seconds"],
        vision_matmul_limit_gflops=vision_limit.value,
        vision_gemm_limit_gflops=vision_gemm_limit.value,
        prefill_seconds=generation["prefill_seconds"],
        prefill_gflop=prefill_flops / 1e9,
        prefill_gflops=prefill_flops / 1e9 / generation["prefill_seconds"],
        prefill_matmul_limit_gflops=generation["prefill_limit_gflops"],
        prefill_gemm_limit_gflops=generation["prefill_gemm_limit_gflops"],
        time_to_first_token_seconds=(
            section["processor_seconds"] + section["vision_seconds"] + generation["prefill_and_first_token_seconds"]
        ),
    )
    section["vision_ratio"] = section["vision_gflops"] / section["vision_matmul_limit_gflops"]
    section["prefill_ratio"] = section["prefill_gflops"] / section["prefill_matmul_limit_gflops"]
    # Against the best matmul rate measured here for the probe's shape, Paddle's or the package's GEMM.
    for stage in ("vision", "prefill"):
        best = max(section[f"{stage}_matmul_limit_gflops"], np.nan_to_num(section[f"{stage}_gemm_limit_gflops"]))
        section[f"{stage}_best_matmul_ratio"] = section[f"{stage}_gflops"] / best
    section["decode"] = decode_report(lm, generation, 1, mean_context(prompt_len, settings.decode_tokens))
    return section, embeds, inputs


def bench_batch(model, processor, image, one_image: tuple, settings: BenchSettings, probe: LimitProbe,
                profiler: Profiler) -> dict:
    """A left-padded batch of one-image prompts with different questions; aggregate decode rate, and its
    speed-up over the first prompt alone decoded in turn with the batch, step for step.

    The image is the same in every row, so its embeddings are taken from the one-image run and
    scattered into each row's image positions instead of running the vision tower again per row.
    """
    lm = model.language
    single_embeds, single_inputs = one_image
    image_embeds = single_embeds[single_inputs.images_seq_mask.astype(paddle.bool)]  # [n_image_tokens, H]
    samples = [processor.process_one(conversations=conversation(q), images=[image]) for q in BATCH_QUESTIONS]
    batch = processor.batchify(samples)
    input_ids, _ = lm_input_ids(batch.input_ids, lm.config.vocab_size)
    section = {"load_average_1min": load_average(), "batch": len(samples), "prompt_tokens": batch.seq_lens}
    with paddle.no_grad():
        text = model.get_input_embeddings()(input_ids)
        image_mask = batch.images_seq_mask.astype(paddle.bool).unsqueeze(-1).expand_as(text)
        embeds = paddle.masked_scatter(text, image_mask, paddle.concat([image_embeds] * len(samples)))
        single, _, _ = prefilled(lm, single_embeds, single_inputs.attention_mask,
                                 rounds_with_settling(settings.decode_tokens))
        generation = run_generation(
            lm, embeds, batch.attention_mask, settings.decode_tokens, profiler, probe, "batch", alongside=single
        )
    section["prefill_seconds"] = generation["prefill_seconds"]
    section["decode"] = decode_report(lm, generation, len(samples),
                                      mean_context(max(batch.seq_lens), settings.decode_tokens))
    (single_seconds,) = generation["alongside_step_seconds"]
    section["speedup_over_single_in_turn"] = len(samples) * sum(single_seconds) / sum(generation["step_seconds"])
    return section


def bench_mla(lm, settings: BenchSettings) -> Optional[dict]:
    """Decode step time at two context lengths on synthetic ids, and the compressed cache size.

    Both contexts are prefilled into their own cache and then decoded in alternation, one step each, so
    a load that drifts on the shared machine touches both medians alike.
    """
    config = lm.config
    if not config.use_mla:
        return None
    rng = np.random.default_rng(0)
    section = {"load_average_1min": load_average(), "contexts": list(settings.mla_contexts)}
    streams = []
    with paddle.no_grad():
        for context in settings.mla_contexts:
            ids = paddle.to_tensor(rng.integers(0, config.vocab_size, size=(1, context)))
            stream, _, _ = prefilled(lm, lm.get_input_embeddings()(ids), paddle.ones([1, context], dtype=paddle.bool),
                                     settings.mla_decode_steps, chunk_size=settings.prefill_chunk)
            streams.append(stream)
        seconds = [stream_seconds for stream_seconds, _ in decode_in_turn(lm, streams, settings.mla_decode_steps)]
    medians = [statistics.median(s) for s in seconds]
    section["median_step_seconds"] = medians
    section["step_growth"] = medians[-1] / medians[0] - 1.0
    section["kv_cache_bytes_per_token"] = streams[0][1].nbytes_per_token()
    section["kv_cache_bytes_per_token_formula"] = model_costs.mla_cache_bytes_per_token(config)
    return section


def run(checkpoint: Path, image_path: Path, settings: BenchSettings, profile_dir: Optional[Path] = None,
        weight_dtype: str = "auto", map_weights: bool = True) -> dict:
    profiler = Profiler(profile_dir)
    report = {"checkpoint": str(checkpoint), "settings": dataclasses.asdict(settings)}
    model, report["load"] = bench_load(checkpoint, profiler, weight_dtype, map_weights)
    probe = LimitProbe(roofline.QUICK_SIZES if settings.roofline_quick else roofline.FULL_SIZES)
    report["roofline"] = roofline.measure(quick=settings.roofline_quick, operands=probe.operands)
    processor = DeepseekVLV2Processor.from_pretrained(str(checkpoint))
    image = Image.open(image_path).convert("RGB")
    report["image_size"] = list(image.size)
    report["one_image"], embeds, inputs = bench_prompt(
        model, processor, [image], ONE_IMAGE_QUESTION, settings, probe, profiler, "one_image"
    )
    report["three_images"], _, _ = bench_prompt(
        model, processor, [image] * 3, THREE_IMAGE_QUESTION, settings, probe, profiler, "three_images"
    )
    report["batch"] = bench_batch(model, processor, image, (embeds, inputs), settings, probe, profiler)
    single_rate = report["one_image"]["decode"]["tokens_per_second_all_steps"]
    report["batch"]["speedup_over_single"] = report["batch"]["decode"]["tokens_per_second_all_steps"] / single_rate
    report["mla"] = bench_mla(model.language, settings)
    report["peak_rss_bytes_end"] = peak_rss_bytes()
    report["mapped_huge_page_fraction_end"] = mapped_huge_page_fraction(checkpoint)
    report["load_average_1min_end"] = load_average()
    return report


def format_table(report: dict) -> str:
    """Figure, value, limit and ratio per row."""
    rows = []
    load = report["load"]
    mapped = load["map_weights"] and load["matrix_dtype"] == "bfloat16"
    held = f"{load['matrix_dtype']} matrices" + (", mapped" if mapped else "")
    rows.append((f"load time ({held})", f"{load['seconds']:.2f} s", f"read files {load['file_read_seconds']:.2f} s",
                 f"{load['time_ratio']:.2f}x"))
    rows.append(("load peak RSS", f"{load['peak_rss_bytes'] / GIB:.2f} GiB",
                 f"fp32 weights + 1 GiB = {load['rss_limit_bytes'] / GIB:.2f} GiB", f"{load['rss_ratio']:.2f}"))
    for key, title in (("one_image", "1 image"), ("three_images", "3 images")):
        part = report[key]
        rows.append((f"{title}: processor", f"{part['processor_seconds'] * 1e3:.0f} ms", "", ""))
        rows.append((f"{title}: vision+projector ({part['tiles']} tiles)", f"{part['vision_seconds']:.2f} s",
                     *_matmul_cells(part, "vision")))
        rows.append((f"{title}: LM prefill ({part['prompt_tokens']} tokens)", f"{part['prefill_seconds']:.2f} s",
                     *_matmul_cells(part, "prefill")))
        rows.append((f"{title}: time to first token", f"{part['time_to_first_token_seconds']:.2f} s", "", ""))
        rows.extend(_decode_rows(title, part["decode"]))
    batch = report["batch"]
    rows.extend(_decode_rows(f"batch of {batch['batch']}", batch["decode"]))
    rows.append((f"batch of {batch['batch']}: speed-up over 1 prompt", f"{batch['speedup_over_single']:.2f}x",
                 f"{batch['batch']}x", ""))
    rows.append((f"batch of {batch['batch']}: speed-up, steps in turn", f"{batch['speedup_over_single_in_turn']:.2f}x",
                 f"{batch['batch']}x", ""))
    mla = report["mla"]
    if mla is not None:
        short, long = mla["contexts"][0], mla["contexts"][-1]
        rows.append((f"MLA decode step at {short} / {long} context",
                     f"{mla['median_step_seconds'][0] * 1e3:.1f} / {mla['median_step_seconds'][-1] * 1e3:.1f} ms",
                     "growth < 10%", f"{mla['step_growth'] * 100:+.1f}%"))
        rows.append(("MLA KV cache per token", f"{mla['kv_cache_bytes_per_token']} B",
                     f"(C + R) x layers x 4 = {mla['kv_cache_bytes_per_token_formula']} B", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    header = ("figure", "value", "limit", "ratio")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(f"CPU: {report['roofline']['cpu_model']}; AMX GEMM for bf16 weights: "
                 f"{'yes' if report['roofline']['amx_gemm'] else 'no'}; 1-min load average at the end: "
                 f"{report['load_average_1min_end']}")
    huge = (load["mapped_huge_page_fraction"], report["mapped_huge_page_fraction_end"])
    if None not in huge:
        lines.append("mapped shard pages in 2 MiB pages after the load / at the end: "
                     f"{huge[0]:.2f} / {huge[1]:.2f}")
    return "\n".join(lines)


def _matmul_cells(part: dict, stage: str) -> tuple:
    """Limit and ratio cells of a matmul-bound stage: against Paddle's matmul, then against the best
    measured (Paddle's or the package's GEMM)."""
    paddle_limit, gemm_limit = part[f"{stage}_matmul_limit_gflops"], part[f"{stage}_gemm_limit_gflops"]
    limit = f"{part[f'{stage}_gflops']:.0f} of {paddle_limit:.0f} (Paddle)"
    if not np.isnan(gemm_limit):
        limit += f" / {gemm_limit:.0f} (GEMM)"
    return f"{limit} GFLOP/s", f"{part[f'{stage}_ratio']:.2f} / {part[f'{stage}_best_matmul_ratio']:.2f}"


def _decode_rows(title: str, decode: dict) -> List[tuple]:
    return [
        (f"{title}: decode, median step", f"{decode['tokens_per_second_median_step']:.2f} tok/s",
         f"{decode['tokens_per_second_limit']:.2f} tok/s at {decode['bandwidth_gbs']:.1f} GB/s", ""),
        (f"{title}: decode, all {decode['steps']} steps", f"{decode['tokens_per_second_all_steps']:.2f} tok/s",
         f"{decode['weight_bytes_per_step'] / 1e9:.2f} GB weights/step", f"{decode['bandwidth_ratio']:.2f}"),
        (f"{title}: decode, probes in turn", f"{decode['achieved_weight_gbs']:.1f} GB/s",
         f"{decode['bandwidth_in_turn_gbs']:.1f} (Paddle) / {decode['best_bandwidth_in_turn_gbs']:.1f} (best) GB/s",
         f"{decode['bandwidth_ratio_in_turn']:.2f} / {decode['best_bandwidth_ratio_in_turn']:.2f}"),
        (f"{title}: decode, its matrices in place", f"{decode['achieved_weight_gbs']:.1f} GB/s",
         f"{decode['step_matrices_gbs']:.1f} GB/s (the kernels alone)", f"{decode['step_matrices_ratio']:.2f}"),
        (f"{title}: decode, max step / median", f"{decode['max_over_median']:.2f}", "< 2", ""),
    ]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark DeepSeek-VL2 inference against this machine's roofline.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder (official layout)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    parser.add_argument("--quick", action="store_true", help="few decode steps, short MLA contexts, quick roofline")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="the 640×480 test image")
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile output per stage here")
    parser.add_argument("--weight_dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="how the Linear matrices are held: auto keeps a bf16 checkpoint's in bf16 where the CPU "
                             "kernels read them (float32 compute either way); float32 widens them at load")
    parser.add_argument("--no_map_weights", action="store_true",
                        help="read bf16-kept matrices into fresh memory instead of mapping them from the shards")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"{args.checkpoint} has no config.json; pass a checkpoint folder")
    if not args.image.is_file():
        parser.error(f"image {args.image} not found; pass --image PATH")
    report = run(args.checkpoint, args.image, QUICK_SETTINGS if args.quick else FULL_SETTINGS, args.profile,
                 args.weight_dtype, not args.no_map_weights)
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
