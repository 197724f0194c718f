"""The command-line examples end to end: golden tokens through the real scripts, the chat driven by stdin,
the default no-argument run, and one-line errors for bad input."""
import dataclasses
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lm_golden import (
    FIXTURES, assert_greedy_match, cases_json, checkpoint_dir, expected, load_processor, load_vl, process_case,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
TINY = checkpoint_dir("micro-tiny")
SMALL_IMAGE = os.path.join(FIXTURES, "images", "small_200x150.png")
EOS_TEXT = "<｜end▁of▁sentence｜>"


def run_example(script, *args, stdin=None):
    """Run ``examples/<script>``; stdout/stderr decoded as UTF-8 without newline translation (answers of the
    random micro model can contain a bare carriage return)."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args], input=None if stdin is None else stdin.encode(),
        capture_output=True, cwd=REPO, env=env, timeout=300,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    )


def case_user_turn(case):
    """(content, image paths) of a single-turn golden case."""
    user = cases_json()[case]["conversations"][0][0]
    return user["content"], [os.path.join(FIXTURES, path) for path in user["images"]]


def split_answer(stdout, content):
    """The printed answer and token ids, after checking the official ``{sft_format} {answer}`` prefix."""
    prefix = f"<|User|>: {content}\n\n<|Assistant|>: "
    assert stdout.startswith(prefix), stdout[:300]
    answer, ids_line = stdout[len(prefix):].rsplit("\ntoken ids: ", 1)
    return answer, [int(token) for token in ids_line.split("\n")[0].split()]


def check_golden_answer(result, case, content, max_new_tokens):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    exp = expected("micro-tiny", case)
    answer, ids = split_answer(result.stdout, content)
    assert len(ids) == max_new_tokens
    assert_greedy_match(np.array([ids]), {**exp, "gen_tokens": exp["gen_tokens"][:, :max_new_tokens]})
    assert answer == load_processor("micro-tiny").decode(exp["gen_tokens"][0, :max_new_tokens].tolist())
    assert f"prompt: {exp['input_ids'].shape[1]} tokens" in result.stderr


def test_multi_image_script_gives_golden_tokens_for_three_images():
    content, images = case_user_turn("v_three_images")
    question = content.split("<image>\n")[-1].strip()
    result = run_example(
        "multi_image_infer.py", "--model_path", TINY, "--image_file_1", images[0], "--image_file_2", images[1],
        "--image_file_3", images[2], "--question", question, "--max_new_tokens", "12", "--show_token_ids",
    )
    check_golden_answer(result, "v_three_images", content, 12)


def test_single_image_script_streams_golden_tokens_and_bf16_falls_back_once():
    content, images = case_user_turn("ii_one_image")
    question = content.split("<image>\n")[-1]
    result = run_example(
        "single_image_infer.py", "--model_path", TINY, "--image_file", images[0], "--question", question,
        "--max_new_tokens", "12", "--stream", "--show_token_ids", "--dtype", "bfloat16",
    )
    check_golden_answer(result, "ii_one_image", content, 12)
    notices = [line for line in result.stderr.splitlines() if "bfloat16" in line]
    assert len(notices) == 1 and "float32" in notices[0]


def test_grounding_script_gives_golden_tokens_and_writes_png(tmp_path):
    content, images = case_user_turn("vii_grounding")
    ref = re.search(r"<\|ref\|>(.*)<\|/ref\|>", content).group(1)
    output = tmp_path / "boxes.png"
    result = run_example(
        "grounding_infer.py", "--model_path", TINY, "--image_file", images[0], "--ref", ref,
        "--max_new_tokens", "6", "--show_token_ids", "--output", str(output),
    )
    check_golden_answer(result, "vii_grounding", content, 6)
    assert f"saved {output}" in result.stdout
    with Image.open(output) as saved, Image.open(images[0]) as original:
        assert saved.format == "PNG" and saved.size == original.size


def test_grounding_drawing_converts_0_999_boxes_to_pixels(tmp_path):
    from paddlemix_vl2.apps.grounding_infer import save_grounding_image
    from paddlemix_vl2.grounding import format_grounding

    width, height, box = 300, 200, (100, 200, 500, 800)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    output = tmp_path / "drawn.png"
    out = io.StringIO()
    objects = save_grounding_image(format_grounding("the cat", [box]) + EOS_TEXT, image, str(output), out)
    assert [(obj.label, obj.boxes) for obj in objects] == [("the cat", [box])]
    left, top, right, bottom = (round(box[0] * width / 999), round(box[1] * height / 999),
                                round(box[2] * width / 999), round(box[3] * height / 999))
    assert f"the cat: [{left}, {top}, {right}, {bottom}] px" in out.getvalue()
    with Image.open(output) as drawn:
        pixels = np.asarray(drawn.convert("RGB"))
    middle_y = (top + bottom) // 2
    assert (pixels[middle_y, left] != 255).any() and (pixels[middle_y, right - 1] != 255).any()
    assert (pixels[middle_y, (left + right) // 2] == 255).all()
    assert (pixels[middle_y, left - 2] == 255).all() and (pixels[middle_y, right + 1] == 255).all()


def test_grounding_drawing_without_boxes_notes_and_saves(tmp_path, capsys):
    from paddlemix_vl2.apps.grounding_infer import save_grounding_image

    image = Image.new("RGB", (40, 30), (255, 255, 255))
    out = io.StringIO()
    answer = "<|ref|>a cat<|/ref|><|det|>[[1, 2, 3]]<|/det|>"
    objects = save_grounding_image(answer, image, str(tmp_path / "n.png"), out)
    assert [obj.boxes for obj in objects] == [[]]
    assert "no boxes in the answer" in out.getvalue()
    assert "note: skipping box [1, 2, 3]" in capsys.readouterr().err
    with Image.open(tmp_path / "n.png") as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))


def library_answer(model, processor, conversation, images, **generation):
    """The answer text (without the end-of-sentence token) and ids, straight from the library API."""
    inputs = processor(conversations=conversation, images=images, force_batchify=True, inference_mode=True,
                       system_prompt="")
    ids = model.generate(**inputs, **generation)[0].tolist()
    finished = ids[-1] == processor.eos_id
    return inputs.sft_format[0], processor.decode(ids[:-1] if finished else ids), finished


def test_answer_ends_at_end_of_sentence_alike_when_streamed_or_not():
    """The micro models practically never emit their eos, so the third greedy token of the text-only case
    stands in for it: both modes stop there, hold it out of the text and report the answer finished."""
    from types import SimpleNamespace

    from paddlemix_vl2.cli import generate_answer
    from paddlemix_vl2.generation import GenerationConfig

    gen_tokens = expected("micro-tiny", "i_text_only")["gen_tokens"][0].tolist()
    stand_in_eos = gen_tokens[2]
    processor = load_processor("micro-tiny")
    with_stand_in = SimpleNamespace(eos_id=stand_in_eos, decode=processor.decode, tokenizer=processor.tokenizer)
    inputs = process_case("micro-tiny", "i_text_only")
    config = GenerationConfig(max_new_tokens=8, eos_token_id=stand_in_eos)
    plain = generate_answer(load_vl("micro-tiny"), with_stand_in, inputs, config)
    streamed_to = io.StringIO()
    streamed = generate_answer(load_vl("micro-tiny"), with_stand_in, inputs, config, stream=streamed_to)
    for answer in (plain, streamed):
        assert answer.token_ids == gen_tokens[:3] and answer.finished
        assert answer.text == processor.decode(gen_tokens[:2])
        assert answer.official_text == processor.decode(gen_tokens[:3])
        assert 0 < answer.first_token_seconds < answer.seconds
    assert streamed_to.getvalue() == plain.text


def test_timing_line_splits_the_first_token_from_the_decoding():
    from paddlemix_vl2.cli import generation_timing

    assert generation_timing(11, 7.0, 2.0) == "11 new tokens in 7.00 s: the first after 2.00 s, then 2.0 tokens/s"
    assert generation_timing(1, 2.5, 2.5) == "1 new token in 2.50 s: the first after 2.50 s"
    assert generation_timing(4, 1.0, None) == "4 new tokens in 1.00 s"
    assert generation_timing(3, 1.5, 0.5, unit="step") == "3 steps in 1.50 s: the first after 0.50 s, then 2.0 steps/s"


def test_chat_keeps_history_attaches_images_and_resets():
    too_long = "red square " * 2500
    script = f"Hello\n{too_long}\n/image {SMALL_IMAGE}\nWhat is this?\n/reset\nHello\n/quit\nnever answered\n"
    result = run_example("chat.py", "--model_path", TINY, "--greedy", "--max_new_tokens", "4", stdin=script)
    assert result.returncode == 2, result.stderr  # the session went on, but one of its turns failed
    assert "Traceback" not in result.stderr and f"attached {SMALL_IMAGE}" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "context is 4096" in errors[0] and "/reset" in errors[0]

    model, processor = load_vl("micro-tiny"), load_processor("micro-tiny")
    settings = dict(max_new_tokens=4, do_sample=False, repetition_penalty=1.1)
    first = [{"role": "<|User|>", "content": "Hello"}, {"role": "<|Assistant|>", "content": ""}]
    _, answer_1, _ = library_answer(model, processor, first, [], **settings)
    second = first[:1] + [
        {"role": "<|Assistant|>", "content": answer_1},
        {"role": "<|User|>", "content": "<image>\nWhat is this?"},
        {"role": "<|Assistant|>", "content": ""},
    ]
    _, answer_2, _ = library_answer(model, processor, second, [Image.open(SMALL_IMAGE).convert("RGB")], **settings)
    assert result.stdout == "".join(f"<|Assistant|>: {answer}\n" for answer in (answer_1, answer_2, answer_1))


def test_an_answer_holding_the_image_tag_does_not_break_later_turns(monkeypatch):
    from paddlemix_vl2.apps import chat
    from paddlemix_vl2.generation import GenerationConfig

    model, processor = load_vl("micro-tiny"), load_processor("micro-tiny")
    real_generate = chat.generate_answer
    answers = iter(["a picture: <image> of nothing", None])

    def first_answer_has_the_tag(model, processor, inputs, config, stream=None):
        answer = real_generate(model, processor, inputs, config, stream=stream)
        text = next(answers)
        return answer if text is None else dataclasses.replace(answer, text=text)

    monkeypatch.setattr(chat, "generate_answer", first_answer_has_the_tag)
    session = chat.ChatSession(model, processor, GenerationConfig(max_new_tokens=2), context=4096)
    session.ask("Hello", io.StringIO())
    second = session.ask("Tell me more", io.StringIO())  # refused before the fix: <image> in an assistant message
    assert len(second.token_ids) >= 1
    assert session.messages[1]["content"] == "a picture:  of nothing"


def test_a_chat_whose_turns_all_succeed_exits_0():
    result = run_example("chat.py", "--model_path", TINY, "--greedy", "--max_new_tokens", "2", stdin="Hello\n/quit\n")
    assert result.returncode == 0 and result.stdout.startswith("<|Assistant|>: "), result.stderr


def test_default_run_asks_each_demo_image_its_question_in_one_batch(capsys):
    from paddlemix_vl2.apps.multi_image_infer import main, parse_args
    from paddlemix_vl2.demo import DEFAULT_CHECKPOINT, DEMO_IMAGES, DEMO_QUESTIONS
    from paddlemix_vl2.models.deepseek_vl2 import DeepseekVLV2ForCausalLM
    from paddlemix_vl2.processors import DeepseekVLV2Processor

    assert main(parse_args(["--max_new_tokens", "12"])) == 0
    printed = capsys.readouterr()
    model = DeepseekVLV2ForCausalLM.from_pretrained(DEFAULT_CHECKPOINT, progress=False)
    processor = DeepseekVLV2Processor.from_pretrained(DEFAULT_CHECKPOINT)
    lines = []
    for question, image in zip(DEMO_QUESTIONS, DEMO_IMAGES):
        conversation = [{"role": "<|User|>", "content": f"<image>\n{question}"}, {"role": "<|Assistant|>", "content": ""}]
        prompt, answer, finished = library_answer(model, processor, conversation, [image], max_new_tokens=12)
        lines.append(f"{prompt} {answer}{EOS_TEXT if finished else ''}\n")
    assert printed.out == "".join(lines)
    assert "3 conversations" in printed.err


def test_weight_storage_flags_leave_the_answers_unchanged(capsys):
    """--weight_dtype float32 and --no_map_weights hold the matrices differently, never compute differently."""
    from paddlemix_vl2.apps.multi_image_infer import main, parse_args

    outputs = []
    for flags in ([], ["--no_map_weights"], ["--weight_dtype", "float32"]):
        assert main(parse_args(["--max_new_tokens", "12", *flags])) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] and outputs[1:] == outputs[:1] * 2


def test_bf16_storage_where_the_kernels_cannot_read_it_is_one_error_line(monkeypatch, capsys):
    from paddlemix_vl2.apps.multi_image_infer import main, parse_args
    from paddlemix_vl2.cli import EXIT_INPUT_ERROR, run_cli
    from paddlemix_vl2.models.deepseek_vl2 import checkpoint

    monkeypatch.setattr(checkpoint, "bf16_weights_supported", lambda: False)
    assert run_cli(main, parse_args, ["--weight_dtype", "bfloat16"]) == EXIT_INPUT_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "use weight_dtype='float32'" in lines[-1], lines  # the status line, the error


def test_a_question_asks_about_all_demo_images_at_once(capsys):
    from paddlemix_vl2.apps.multi_image_infer import main, parse_args
    from paddlemix_vl2.demo import DEMO_IMAGES

    assert main(parse_args(["--model_path", TINY, "--max_new_tokens", "3", "--question", "Which is odd?"])) == 0
    printed = capsys.readouterr()
    content = "".join(f"This is image_{k}: <image>\n" for k in range(1, 4)) + " Which is odd?"
    conversation = [{"role": "<|User|>", "content": content}, {"role": "<|Assistant|>", "content": ""}]
    prompt, answer, finished = library_answer(
        load_vl("micro-tiny"), load_processor("micro-tiny"), conversation, list(DEMO_IMAGES), max_new_tokens=3
    )
    assert printed.out == f"{prompt} {answer}{EOS_TEXT if finished else ''}\n"
    assert "3 image(s)" in printed.err


def test_demo_batch_refuses_stream():
    from paddlemix_vl2.apps.multi_image_infer import cli

    assert cli(["--stream"]) == 2


def test_repeated_image_file_takes_any_number_of_images_with_chunked_prefill(capsys):
    from paddlemix_vl2.apps.multi_image_infer import main, parse_args

    argv = ["--model_path", TINY, "--max_new_tokens", "3", "--chunk_size", "300", "--question", "Which is odd?"]
    assert main(parse_args(argv + ["--image_file", SMALL_IMAGE] * 4)) == 0
    content = "".join(f"This is image_{k}: <image>\n" for k in range(1, 5)) + " Which is odd?"
    conversation = [{"role": "<|User|>", "content": content}, {"role": "<|Assistant|>", "content": ""}]
    prompt, answer, finished = library_answer(
        load_vl("micro-tiny"), load_processor("micro-tiny"), conversation, [SMALL_IMAGE] * 4, max_new_tokens=3
    )
    assert capsys.readouterr().out == f"{prompt} {answer}{EOS_TEXT if finished else ''}\n"


def test_image_flags_resolve_in_prompt_order():
    from paddlemix_vl2.apps.multi_image_infer import image_paths, parse_args
    from paddlemix_vl2.cli import CLIInputError
    from paddlemix_vl2.demo import DEMO_IMAGES

    assert image_paths(parse_args([])) == list(DEMO_IMAGES)
    assert image_paths(parse_args(["--image_file_1", "a", "--image_file_2", "b"])) == ["a", "b"]
    assert image_paths(parse_args(["--image_file", "c", "--image_file", "a", "--image_file", "b"])) == ["c", "a", "b"]
    with pytest.raises(CLIInputError, match="--image_file_2 is missing"):
        image_paths(parse_args(["--image_file_1", "a", "--image_file_3", "c"]))
    with pytest.raises(CLIInputError, match="not both"):
        image_paths(parse_args(["--image_file_1", "a", "--image_file", "b"]))


def test_gpus_without_bf16_compute_in_float16(caplog):
    from paddlemix_vl2.cli import choose_dtype

    assert choose_dtype(None, None) is None and choose_dtype("bfloat16", None) == "bfloat16"
    assert choose_dtype("bfloat16", (8, 0)) == "bfloat16" and choose_dtype("float32", (7, 0)) == "float32"
    caplog.clear()
    assert choose_dtype(None, (7, 0)) == "float16" and choose_dtype("bfloat16", (7, 5)) == "float16"
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]


BAD_INPUTS = {
    "missing image": (["--image_file", "no_such_image.png"], "no_such_image.png' not found"),
    "corrupt image": (["--image_file", "{corrupt}"], "cannot read image file"),
    "empty question": (["--question", "   "], "--question is empty"),
    "prompt too long": (["--model_path", TINY, "--image_file", SMALL_IMAGE, "--question", "red square " * 2500],
                        "model's context is 4096"),
    "model path missing": (["--model_path", "deepseek-ai/deepseek-vl2-tiny"], "is not a folder"),
    "model path not a checkpoint": (["--model_path", os.path.join(FIXTURES, "images")], "has no config.json"),
    "top_p out of range": (["--top_p", "2"], "top_p must be in (0, 1]"),
    "unknown dtype": (["--dtype", "float64"], "invalid choice: 'float64'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_error_line(case, tmp_path):
    argv, message = BAD_INPUTS[case]
    corrupt = tmp_path / "corrupt.png"
    with open(SMALL_IMAGE, "rb") as f:
        corrupt.write_bytes(f.read()[:300])
    result = run_example("multi_image_infer.py", *[arg.format(corrupt=corrupt) for arg in argv])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and message in lines[0], result.stderr


@pytest.mark.parametrize("script, argv, message", [
    ("grounding_infer.py", ["--output", "/no/such/folder/out.png"], "does not exist"),
    ("grounding_infer.py", ["--output", EXAMPLES], "is a folder; give the PNG file to write"),
    ("chat.py", ["--image_file", "no_such_image.png"], "no_such_image.png' not found"),
    # The fine-tuning scripts: a flag error is one line (no usage block), and Paddle's import notices stay quiet.
    ("finetune/finetune.py", ["--model_path", "x"], "required: --dataset/--meta_path, --output_dir (see --help)"),
    ("finetune/lora_merge.py", ["--lora_path", "x"], "required: --model_name_or_path/--model_path, --merge_model_path"),
])
def test_other_examples_report_bad_input_in_one_line(script, argv, message):
    result = run_example(script, *argv, stdin="")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_python_m_lists_and_dispatches_commands():
    def run_module(*args):
        return subprocess.run([sys.executable, "-m", "paddlemix_vl2", *args], capture_output=True, text=True, cwd=REPO)

    listing = run_module()
    assert listing.returncode == 0
    for command in ("infer", "single", "ground", "chat"):
        assert re.search(rf"^  {command} ", listing.stdout, re.MULTILINE)
    sub_help = run_module("ground", "--help")
    assert sub_help.returncode == 0 and sub_help.stdout.startswith("usage: python -m paddlemix_vl2 ground")
    unknown = run_module("paint")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1


def test_console_scripts_point_at_callables():
    import importlib

    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        scripts = dict(re.findall(r'"([\w-]+)=([\w.]+:\w+)"', f.read()))
    assert {"paddlemix-vl2", "paddlemix-vl2-infer", "paddlemix-vl2-chat", "paddlemix-vl2-ground"} <= set(scripts)
    for target in scripts.values():
        module, attribute = target.split(":")
        assert callable(getattr(importlib.import_module(module), attribute))


def test_run_cli_maps_input_errors_and_ctrl_c_to_exit_codes_and_keeps_bug_tracebacks(capsys):
    from paddlemix_vl2.cli import CLIInputError, run_cli

    def raising(error):
        def main(args):
            raise error
        return main

    assert run_cli(raising(KeyboardInterrupt()), lambda argv: argv, []) == 130
    assert run_cli(raising(CLIInputError("--question is empty")), lambda argv: argv, []) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: --question is empty"
    with pytest.raises(ZeroDivisionError):
        run_cli(raising(ZeroDivisionError("a bug")), lambda argv: argv, [])
