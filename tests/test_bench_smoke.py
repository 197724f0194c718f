"""One quick run of benchmarks/bench_infer.py per micro checkpoint: the report has every field, and the
figures that follow from the config alone are exact.

The benchmark is a script, so it runs in a subprocess exactly as a user runs it. Timings are not checked:
this is not a timed test.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import checkpoint_dir

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
BENCH_SCRIPT = os.path.join(TESTS_DIR, "..", "benchmarks", "bench_infer.py")
# The benchmark scripts import their siblings by bare name, as they do when run as scripts.
sys.path.insert(0, os.path.dirname(BENCH_SCRIPT))

LOAD_FIELDS = {
    "load_average_1min", "file_bytes", "file_read_seconds", "seconds", "peak_rss_bytes", "fp32_weight_bytes",
    "rss_limit_bytes", "rss_ratio", "time_ratio", "weight_dtype", "matrix_dtype", "stored_weight_bytes",
    "map_weights", "mapped_huge_page_fraction",
}
PROMPT_FIELDS = {
    "load_average_1min", "images", "processor_seconds", "synthetic_text_ids", "prompt_tokens", "tiles",
    "vision_seconds", "vision_gflop", "vision_gflops", "vision_matmul_limit_gflops", "vision_ratio",
    "vision_gemm_limit_gflops", "vision_best_matmul_ratio",
    "prefill_seconds", "prefill_gflop", "prefill_gflops", "prefill_matmul_limit_gflops", "prefill_ratio",
    "prefill_gemm_limit_gflops", "prefill_best_matmul_ratio",
    "time_to_first_token_seconds", "decode",
}
DECODE_FIELDS = {
    "steps", "batch", "median_step_seconds", "max_step_seconds", "max_over_median", "step_seconds",
    "tokens_per_second_median_step", "tokens_per_second_all_steps", "weight_bytes_per_step", "kv_cache_bytes_read_per_step", "achieved_weight_gbs",
    "bandwidth_gbs", "bandwidth_ratio", "tokens_per_second_limit", "bandwidth_in_turn_gbs",
    "bandwidth_in_turn_probes", "bandwidth_ratio_in_turn", "best_bandwidth_in_turn_gbs",
    "best_bandwidth_ratio_in_turn", "step_matrices_gbs", "step_matrices_ratio",
}
BATCH_FIELDS = {
    "load_average_1min", "batch", "prompt_tokens", "prefill_seconds", "decode", "speedup_over_single",
    "speedup_over_single_in_turn",
}
MLA_FIELDS = {
    "load_average_1min", "contexts", "median_step_seconds", "step_growth", "kv_cache_bytes_per_token",
    "kv_cache_bytes_per_token_formula",
}
TOP_FIELDS = {
    "checkpoint", "settings", "load", "roofline", "image_size", "one_image", "three_images", "batch", "mla",
    "peak_rss_bytes_end", "load_average_1min_end", "mapped_huge_page_fraction_end",
}


def run_bench(tmp_path, name, *flags):
    report_path = tmp_path / f"{name}.json"
    completed = subprocess.run(
        [sys.executable, BENCH_SCRIPT, "--checkpoint", checkpoint_dir(name), "--quick", "--json", str(report_path),
         *flags],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "decode, median step" in completed.stdout
    return json.loads(report_path.read_text())


def assert_positive_numbers(section, fields):
    for field in fields:
        value = section[field]
        assert isinstance(value, (int, float)) and value > 0, f"{field} = {value!r}"


def check_in_turn_bandwidth(decode):
    """One probe pair (Paddle's limit, the package GEMV) per ``IN_TURN_PROBE_EVERY`` rounds of steps and one
    after the last; the ratios are the achieved rate over the medians of Paddle's and of the better one."""
    from bench_infer import IN_TURN_PROBE_EVERY

    probes = np.array(decode["bandwidth_in_turn_probes"], dtype=float)
    assert probes.shape == (-(-decode["steps"] // IN_TURN_PROBE_EVERY), 2) and (probes[:, 0] > 0).all()
    paddle_median, best_median = np.median(probes[:, 0]), np.median(np.fmax(probes[:, 0], probes[:, 1]))
    assert decode["bandwidth_in_turn_gbs"] == pytest.approx(paddle_median)
    assert decode["best_bandwidth_in_turn_gbs"] == pytest.approx(best_median)
    assert decode["bandwidth_ratio_in_turn"] == pytest.approx(decode["achieved_weight_gbs"] / paddle_median)
    assert decode["best_bandwidth_ratio_in_turn"] == pytest.approx(decode["achieved_weight_gbs"] / best_median)


def check_step_matrices(decode):
    """The step's matrices streamed in place: a rate wherever the CPU kernels run, and the ratio over it."""
    from paddlemix_vl2.models.deepseek_vl2 import native

    if native.kernel_library() is None:
        assert np.isnan(decode["step_matrices_gbs"])
        return
    assert decode["step_matrices_gbs"] > 0
    assert decode["step_matrices_ratio"] == pytest.approx(decode["achieved_weight_gbs"] / decode["step_matrices_gbs"])


def check_common(report, config):
    assert set(report) == TOP_FIELDS
    assert set(report["load"]) == LOAD_FIELDS
    assert_positive_numbers(
        report["load"],
        LOAD_FIELDS - {"load_average_1min", "weight_dtype", "matrix_dtype", "map_weights", "mapped_huge_page_fraction"},
    )
    mapped = report["load"]["map_weights"] and report["load"]["matrix_dtype"] == "bfloat16"
    for huge in (report["load"]["mapped_huge_page_fraction"], report["mapped_huge_page_fraction_end"]):
        assert (huge is not None and 0.0 <= huge <= 1.0) if mapped and os.path.exists("/proc/self/smaps") else huge is None
    assert report["load"]["matrix_dtype"] in ("float32", "bfloat16")
    assert report["image_size"] == [640, 480]
    for key, images, tiles in (("one_image", 1, 5), ("three_images", 3, 6)):
        section = report[key]
        assert set(section) == PROMPT_FIELDS
        assert (section["images"], section["tiles"]) == (images, tiles)
        assert set(section["decode"]) == DECODE_FIELDS
        assert section["decode"]["steps"] == report["settings"]["decode_tokens"]
        check_in_turn_bandwidth(section["decode"])
        check_step_matrices(section["decode"])
        assert_positive_numbers(section, {"vision_seconds", "vision_gflops", "prefill_seconds", "prefill_gflops"})
    assert set(report["batch"]) == BATCH_FIELDS
    assert set(report["batch"]["decode"]) == DECODE_FIELDS
    assert report["batch"]["decode"]["batch"] == 4 and len(report["batch"]["prompt_tokens"]) == 4
    assert_positive_numbers(report["batch"], {"speedup_over_single", "speedup_over_single_in_turn"})
    check_in_turn_bandwidth(report["batch"]["decode"])
    check_step_matrices(report["batch"]["decode"])
    lm = config["language_config"]
    # fp32 bytes of every parameter the port builds, counted independently from the checkpoint's headers.
    assert report["load"]["fp32_weight_bytes"] == 2 * bf16_bytes_in_checkpoint(report["checkpoint"])
    return lm


def bf16_bytes_in_checkpoint(folder):
    """Bytes of the bf16 tensors the model uses (the unused SigLIP attention-pooling head is skipped)."""
    from safetensors import safe_open

    total = 0
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    for shard in shards:
        with safe_open(os.path.join(folder, shard), framework="numpy") as f:
            for name in f.keys():
                if not name.startswith("vision.attn_pool."):
                    count = 1
                    for dim in f.get_slice(name).get_shape():
                        count *= dim
                    total += 2 * count
    return total


def test_quick_run_on_mha_checkpoint_reports_every_field(tmp_path):
    report = run_bench(tmp_path, "micro-tiny")
    assert report["load"]["weight_dtype"] == "auto" and report["load"]["map_weights"] is True
    config = json.load(open(os.path.join(checkpoint_dir("micro-tiny"), "config.json")))
    check_common(report, config)
    assert report["mla"] is None


def test_storage_flags_reach_the_load(tmp_path):
    """--weight_dtype float32 holds every matrix in float32; --no_map_weights is recorded."""
    report = run_bench(tmp_path, "micro-tiny", "--weight_dtype", "float32", "--no_map_weights")
    load = report["load"]
    assert (load["weight_dtype"], load["matrix_dtype"], load["map_weights"]) == ("float32", "float32", False)
    assert load["stored_weight_bytes"] == load["fp32_weight_bytes"]


def test_quick_run_on_mla_checkpoint_reports_cache_size(tmp_path):
    report = run_bench(tmp_path, "micro-small")
    config = json.load(open(os.path.join(checkpoint_dir("micro-small"), "config.json")))
    lm = check_common(report, config)
    mla = report["mla"]
    assert set(mla) == MLA_FIELDS
    assert mla["contexts"] == report["settings"]["mla_contexts"] and len(mla["median_step_seconds"]) == 2
    expected = (lm["kv_lora_rank"] + lm["qk_rope_head_dim"]) * lm["num_hidden_layers"] * 4
    assert mla["kv_cache_bytes_per_token"] == mla["kv_cache_bytes_per_token_formula"] == expected


def test_decode_weight_bytes_equal_the_parameters_a_step_touches():
    """model_costs against the built model: the bytes of every LM parameter except the embedding table and
    the routed experts a step does not use, with the matrices in float32 and (where the kernels read it) bf16."""
    import model_costs
    from lm_golden import load_lm

    for name in ("micro-tiny", "micro-small", "micro-full"):
        for lm in (load_lm(name, "auto"), load_lm(name, "float32")):
            config = lm.config
            moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
            active = [config.num_experts_per_tok + i for i in range(len(moe_layers))]  # any count per layer
            expert = lm.model.layers[moe_layers[0]].mlp.experts[0].parameters()
            expert_bytes = sum(int(p.size) * p.element_size() for p in expert)
            touched = sum(
                int(p.size) * p.element_size() for n, p in lm.named_parameters() if n != "model.embed_tokens.weight"
            )
            touched -= sum(config.n_routed_experts - a for a in active) * expert_bytes
            matrix_bytes = lm.lm_head.weight.element_size()
            assert model_costs.decode_weight_bytes(config, active, matrix_bytes) == touched, (name, matrix_bytes)


def test_step_matrices_are_the_bytes_a_step_reads_but_the_norms():
    """step_weights.step_parts for a step's routing: model_costs' bytes for those expert counts, less the
    vectors (the RMSNorm weights and noaux_tc's score bias, counted from the model's parameters), on MHA, MLA
    and noaux_tc checkpoints."""
    import model_costs
    import step_weights
    from lm_golden import load_lm

    rng = np.random.default_rng(0)
    for name in ("micro-tiny", "micro-small", "micro-full"):
        lm = load_lm(name, "auto")
        config = lm.config
        routing = [
            rng.integers(0, config.n_routed_experts, size=(2, config.num_experts_per_tok))
            for _ in range(step_weights.moe_layer_count(config))
        ]
        matrices = step_weights.step_matrices(step_weights.step_parts(lm, routing))
        vector_bytes = sum(int(p.size) * p.element_size() for p in lm.parameters() if len(p.shape) == 1)
        expected = model_costs.decode_weight_bytes(
            config, [len(np.unique(r)) for r in routing], lm.lm_head.weight.element_size()
        )
        assert step_weights.matrix_bytes(matrices) == expected - vector_bytes, name
        assert matrices[-1] is lm.lm_head.weight
        with pytest.raises(ValueError, match="MoE layers"):
            step_weights.step_parts(lm, routing[1:])


def test_step_weights_stream_at_a_rate_where_the_kernels_run(monkeypatch):
    """stream_gbs over a micro checkpoint's step gives a best and a median rate when the CPU kernels run,
    and None without them."""
    import step_weights
    from lm_golden import load_lm
    from paddlemix_vl2.models.deepseek_vl2 import native

    for name in ("micro-tiny", "micro-small"):
        lm = load_lm(name, "auto")
        config = lm.config
        chosen = np.arange(config.num_experts_per_tok).reshape(1, -1)
        parts = step_weights.step_parts(lm, [chosen] * step_weights.moe_layer_count(config))
        rate = step_weights.stream_gbs(parts, repeats=2)
        if native.kernel_library() is None:
            assert rate is None
        else:
            assert rate.best >= rate.median > 0, name
    monkeypatch.setattr(native, "kernel_library", lambda: None)
    assert step_weights.stream_gbs(parts, repeats=2) is None


class LinearFlops:
    """Sums 2 · rows · in · out over every Linear call inside ``layer`` while active."""

    def __init__(self, layer):
        from paddlemix_vl2.models.deepseek_vl2.layers import Linear

        self.total = 0
        self._hooks = [
            sub.register_forward_post_hook(self._count)
            for sub in layer.sublayers(include_self=True) if isinstance(sub, Linear)
        ]

    def _count(self, layer, inputs, output):
        rows = 1
        for dim in inputs[0].shape[:-1]:
            rows *= dim
        fan_out, fan_in = layer.weight.shape
        self.total += 2 * rows * fan_in * fan_out

    def remove(self):
        for hook in self._hooks:
            hook.remove()


def test_prefill_flops_equal_the_executed_matmuls():
    """lm_prefill_flops against the Linear calls a prefill really makes, plus the matmuls outside
    Linear layers written out here: the router, MLA's kv_b_proj expansion and the causal attention pairs
    (the prefill runs MLA expanded, checked below)."""
    import paddle

    import model_costs
    from lm_golden import load_lm

    for name in ("micro-tiny", "micro-small", "micro-full"):
        lm = load_lm(name)
        config, length = lm.config, 37
        ids = paddle.to_tensor(np.random.default_rng(0).integers(3, config.vocab_size, size=(1, length)))
        counter = LinearFlops(lm)
        # With gradients on, every MLP runs through its Linear layers (the no-grad decode kernels would run
        # an expert with few tokens in one native call that the hooks do not see).
        lm(input_ids=ids, logits_to_keep=1)
        counter.remove()
        layers = lm.model.layers
        router = sum(2 * length * config.hidden_size * config.n_routed_experts
                     for i in range(config.num_hidden_layers) if config.is_moe_layer(i))
        pairs = length * (length + 1) // 2
        if config.use_mla:
            assert all(layer.self_attn.expanded_is_cheaper(length, length) for layer in layers), name
            expansion = sum(2 * length * int(layer.self_attn.kv_b_proj.weight.size) for layer in layers)
            per_pair = config.num_attention_heads * (
                config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
            )
        else:
            expansion = 0
            per_pair = config.num_attention_heads * 2 * config.head_dim
        attention = 2 * config.num_hidden_layers * per_pair * pairs
        expected = counter.total + router + expansion + attention
        assert model_costs.lm_prefill_flops(config, [length]) == expected, name


def test_vision_flops_equal_the_executed_matmuls():
    """vision_flops against the tower's and projector's Linear calls, plus the patch convolution and the
    all-pairs attention written out here."""
    import paddle

    import model_costs
    from lm_golden import load_vl

    model = load_vl("micro-tiny")
    vision, tiles = model.config.vision_config, 2
    counter = LinearFlops(model)
    with paddle.no_grad():
        model.encode_tiles(paddle.zeros([tiles, 3, vision.image_size, vision.image_size]))
    counter.remove()
    patches = vision.grid_size ** 2
    conv = 2 * tiles * patches * 3 * vision.patch_size ** 2 * vision.width
    attention = 4 * tiles * vision.layers * patches * patches * vision.width
    expected = counter.total + conv + attention
    assert model_costs.vision_flops(vision, model.config.projector_config, tiles) == expected


def test_demo_box_tolerance_snaps_boxes_outwards_to_the_patch_grid():
    from demo_box_tolerance import snap_to_patches

    # A square 384-px image is its own view: pixel edges snap to multiples of 24.
    assert snap_to_patches([30, 50, 100, 200], 384, 384, 24) == [24, 48, 120, 216]
    # 600 x 300 shrinks by 0.64 and is padded by 96 px above and below: x 64..128 in the view snaps to
    # 48..144, y 102.4..166.4 to 96..168; back in image pixels that is 75..225 and 0..112.5.
    assert np.allclose(snap_to_patches([100, 10, 200, 110], 600, 300, 24), [75, 0, 225, 112.5])


def test_demo_tower_probe_finds_the_shipped_tower_names_the_pairs():
    script = os.path.join(os.path.dirname(BENCH_SCRIPT), "demo_tower_probe.py")
    out = subprocess.run([sys.executable, script, "--train_scenes", "60", "--test_scenes", "20"],
                         capture_output=True, text=True, check=True).stdout
    held_out = float(out.split("held out ")[1].split()[0])
    # Chance among the 12 pairs is 0.083; the shipped tower scored 0.869 with 400 / 150 scenes.
    assert held_out > 0.6, out


def test_demo_grounding_attention_splits_the_cells_by_shape():
    from demo_grounding_attention import cell_regions

    # A square 384-px image is its own view of 8 x 8 cells of 48 px: the asked box covers cell 0 alone, the
    # other box (100..150 px) the four cells of rows and columns 2..3.
    regions = cell_regions((384, 384), (0, 0, 48, 48), [(100, 100, 150, 150)], view=384, grid=8)
    expected = np.full(64, 2)
    expected[0] = 0
    expected[[18, 19, 26, 27]] = 1
    assert regions.tolist() == expected.tolist()


def test_streams_decoded_in_turn_decode_as_they_would_alone():
    """bench_infer.decode_in_turn: each stream gets its own tokens and its own routing records (one count
    per MoE layer per step, at most K per row), the same as when it is decoded alone; ``between`` runs
    after every ``every`` rounds and after the last, and the round after it (``settling_rounds``) is
    decoded but not timed; a cache without room for those rounds is refused before any step."""
    import paddle
    from bench_infer import decode_in_turn, prefilled, settling_rounds
    from lm_golden import load_lm

    lm = load_lm("micro-tiny", "float32")
    config = lm.config
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    rng = np.random.default_rng(0)
    prompts = [paddle.to_tensor(rng.integers(0, config.vocab_size, size=(rows, 7))) for rows in (1, 2)]
    steps, every = 5, 2
    settling = settling_rounds(steps, every)

    def fresh_streams(room):
        with paddle.no_grad():
            return [prefilled(lm, lm.get_input_embeddings()(ids), paddle.ones(ids.shape, dtype=paddle.bool),
                              room - 1)[0] for ids in prompts]  # prefilled leaves one position spare

    streams = fresh_streams(steps + settling)
    rounds_seen = []  # steps each stream had taken when ``between`` ran
    with paddle.no_grad():
        together = decode_in_turn(lm, streams, steps, every=every, between=lambda: rounds_seen.append(
            [len(cache.routing) // moe_layers for _, cache, _ in streams]))
        plain = [decode_in_turn(lm, [stream], steps + settling)[0] for stream in fresh_streams(steps + settling)]
        with pytest.raises(ValueError, match="cannot take 7 steps"):
            decode_in_turn(lm, fresh_streams(steps), steps, every=every, between=lambda: None)
    timed = [0, 1, 3, 4, 6]  # of the seven steps: two, a settling one, two, a settling one, one
    for (seconds, experts), (_, experts_plain), ids in zip(together, plain, prompts):
        assert len(seconds) == steps and all(s > 0 for s in seconds)
        assert experts == [experts_plain[i] for i in timed]
        assert all(len(step) == moe_layers for step in experts)
        assert all(1 <= count <= config.num_experts_per_tok * ids.shape[0] for step in experts for count in step)
    assert settling == 2 and rounds_seen == [[2, 2], [5, 5], [7, 7]]
    assert settling_rounds(64) == 15 and settling_rounds(1) == 0 and settling_rounds(0) == 0


def test_profiler_leaves_paused_work_out_of_the_stage(tmp_path):
    """bench_infer.Profiler: what runs inside ``paused`` (the probes between decode steps) is not in the stage's
    profile; what runs around it is."""
    import pstats

    from bench_infer import Profiler

    def measured_work():
        return sum(range(1000))

    def probe_work():
        return sum(range(1000))

    profiler = Profiler(tmp_path)
    with profiler.stage("decode"):
        measured_work()
        with profiler.paused():
            probe_work()
        measured_work()
    with profiler.paused():  # outside a stage: nothing to pause
        probe_work()
    called = {name for _, _, name in pstats.Stats(str(tmp_path / "decode.prof")).stats}
    assert "measured_work" in called and "probe_work" not in called
