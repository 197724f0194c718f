"""Shared pieces of the command-line examples: flags, loading, one answered turn, error reporting.

Every example (``paddlemix_vl2.apps.*``, wrapped by ``examples/*.py``) is ``parse_args(argv)`` then
``main(args) -> exit code``, run through ``run_cli``: the project's input errors become one
``error: ...`` line on stderr and exit code 2, Ctrl-C exit code 130.

Output convention: stdout carries what the user asked for (the rendered conversation and the answer, in
the official ``print(sft_format, answer)`` form); progress figures go to stderr.

Paddle takes seconds to import and prints two notices meant for other audiences, so nothing at module
level here pulls it in: ``--help`` and argument errors answer at once, and the functions that need the
model import it when called (``run_cli`` imports Paddle once, quietly, before ``main`` runs).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from .demo import DEFAULT_CHECKPOINT
from .paddle_version import PaddleVersionError, require_paddle

__all__ = [
    "ASSISTANT_ROLE",
    "Answer",
    "CHAT_DEFAULTS",
    "CLIArgumentParser",
    "CLIInputError",
    "DTYPES",
    "EXAMPLE_DEFAULTS",
    "GenerationDefaults",
    "add_generation_args",
    "add_model_args",
    "add_output_args",
    "answer_each",
    "answer_one_turn",
    "check_checkpoint_dir",
    "check_prompt_fits",
    "choose_dtype",
    "context_length",
    "error_line",
    "generate_answer",
    "generation_config",
    "import_paddle_quietly",
    "finetune_main",
    "lora_merge_main",
    "load_model",
    "load_pil_images",
    "load_processor",
    "open_images",
    "require_text",
    "run_cli",
    "status",
    "user_errors",
    "user_turn",
    "USER_ROLE",
]

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
USER_ROLE, ASSISTANT_ROLE = "<|User|>", "<|Assistant|>"
# bfloat16 arithmetic needs compute capability 8.0 (Ampere); V100 (7.0) and T4 (7.5) have only float16.
BF16_MIN_CAPABILITY = (8, 0)
_PADDLE_IMPORT_NOTICES = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")

Conversation = List[Dict[str, Any]]


class CLIInputError(ValueError):
    """A command-line value the examples cannot use; the message names the flag and the fix."""


class CLIArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: ... (see --help)`` instead of usage plus error."""

    def error(self, message: str):
        self.exit(EXIT_INPUT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


@dataclass(frozen=True)
class GenerationDefaults:
    """Per-command defaults of the generation flags."""

    do_sample: bool
    temperature: float
    top_p: float
    repetition_penalty: float
    max_new_tokens: int = 512


# The examples decode greedily, as the official README and PaddleMIX's scripts do; --do_sample switches to
# the sampling settings of the official inference.py (temperature 0.4, top_p 0.9).
EXAMPLE_DEFAULTS = GenerationDefaults(do_sample=False, temperature=0.4, top_p=0.9, repetition_penalty=1.0)
# The chat samples with the official inference.py settings, repetition penalty included.
CHAT_DEFAULTS = GenerationDefaults(do_sample=True, temperature=0.4, top_p=0.9, repetition_penalty=1.1)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_path", "--model_name_or_path", dest="model_path", default=DEFAULT_CHECKPOINT,
        help="DeepSeek-VL2 checkpoint folder (config.json, processor and tokenizer files, *.safetensors); "
        "default: the bundled demo checkpoint (not DeepSeek's weights)",
    )
    group.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help="compute dtype; default bfloat16 on a GPU, float32 on a CPU. A CPU always computes in float32. "
        "Use float16 on GPUs without bfloat16 (V100, T4); those pick it by themselves",
    )
    group.add_argument(
        "--weight_dtype", choices=("auto", "float32", "bfloat16"), default="auto",
        help="how a CPU holds a bf16 checkpoint's matrices: auto (default) keeps them bf16 where the package's "
        "AVX-512 kernels read them (same float32 results, half the memory), float32 widens them at load",
    )
    group.add_argument(
        "--no_map_weights", dest="map_weights", action="store_false",
        help="read the bf16-kept matrices into memory instead of mapping them from the shard files: a slower "
        "start, faster decoding on some machines (long chats)",
    )


def add_generation_args(parser: argparse.ArgumentParser, defaults: GenerationDefaults) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--max_new_tokens", type=positive_int, default=defaults.max_new_tokens,
                       help="most tokens to generate (default: %(default)s)")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--do_sample", dest="do_sample", action="store_true", default=defaults.do_sample,
                      help="sample with --temperature/--top_p/--top_k" + (" (default)" if defaults.do_sample else ""))
    mode.add_argument("--greedy", dest="do_sample", action="store_false",
                      help="always take the most likely token" + ("" if defaults.do_sample else " (default)"))
    group.add_argument("--temperature", type=float, default=defaults.temperature,
                       help="sampling temperature (default: %(default)s)")
    group.add_argument("--top_p", type=float, default=defaults.top_p,
                       help="nucleus sampling mass (default: %(default)s)")
    group.add_argument("--top_k", type=non_negative_int, default=0, help="keep the k best tokens; 0 = all (default)")
    group.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty,
                       help="penalty for repeating prompt or answer tokens; 1 = none (default: %(default)s)")
    group.add_argument("--seed", type=non_negative_int, default=None, help="makes sampling repeat exactly")
    group.add_argument("--chunk_size", type=non_negative_int, default=0,
                       help="prefill the prompt in chunks of this many tokens to bound memory on long multi-image "
                       "prompts; 0 = one pass (default)")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--stream", action="store_true", help="print the answer while it is generated")
    group.add_argument("--show_token_ids", action="store_true", help="also print the generated token ids")


def generation_config(args: argparse.Namespace):
    """The ``GenerationConfig`` of the parsed generation flags (``SamplingConfigError`` if out of range)."""
    from .generation import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
        chunk_size=args.chunk_size,
    )


def require_text(value: Optional[str], flag: str) -> str:
    """``value`` stripped; a ``CLIInputError`` naming ``flag`` when nothing is left."""
    text = (value or "").strip()
    if not text:
        raise CLIInputError(f"{flag} is empty: give it some text")
    return text


def user_turn(content: str, image_paths: Sequence[str]) -> Conversation:
    """A one-question conversation in the official form: the user turn, then an empty assistant turn."""
    return [
        {"role": USER_ROLE, "content": content, "images": list(image_paths)},
        {"role": ASSISTANT_ROLE, "content": ""},
    ]


def open_images(paths: Sequence[str]) -> list:
    """RGB PIL images of ``paths`` (``FileNotFoundError`` / ``ImageLoadError`` name the bad file)."""
    from .processors import load_image

    return [load_image(path) for path in paths]


def load_pil_images(conversation: Conversation) -> list:
    """RGB PIL images of every message's ``images`` list, in order."""
    return open_images([path for message in conversation for path in message.get("images", ())])


def check_checkpoint_dir(path: str) -> None:
    """Fail early, naming ``--model_path``, when ``path`` cannot be a checkpoint folder."""
    if not os.path.isdir(path):
        raise CLIInputError(
            f"--model_path {path!r} is not a folder: pass a DeepSeek-VL2 checkpoint folder (model names such as "
            "deepseek-ai/deepseek-vl2-tiny are not downloaded; download the folder first)"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIInputError(f"--model_path {path!r} is not a DeepSeek-VL2 checkpoint folder: it has no config.json")


def load_processor(model_path: str):
    from .processors import DeepseekVLV2Processor

    check_checkpoint_dir(model_path)
    return DeepseekVLV2Processor.from_pretrained(model_path)


def context_length(model_path: str) -> int:
    """The language model's context window, read from config.json without loading weights."""
    from .models.deepseek_vl2 import DeepseekVLV2Config

    return DeepseekVLV2Config.from_pretrained(model_path).language_config.max_position_embeddings


PROMPT_ADVICE = "shorten the question or use fewer or smaller images (421 tokens each untiled, up to ~2000 tiled)"


def check_prompt_fits(prompt_tokens: int, context: int, advice: str = PROMPT_ADVICE) -> None:
    """``PromptTooLongError`` (ending with ``advice``) unless a token can be generated after the prompt."""
    from .generation import PromptTooLongError

    if prompt_tokens >= context:
        raise PromptTooLongError(
            f"the prompt has {prompt_tokens} tokens but the model's context is {context}: {advice}"
        )


def choose_dtype(requested: Optional[str], gpu_capability: Optional[Tuple[int, int]]) -> Optional[str]:
    """The dtype to load with: float16 instead of bfloat16 (asked for or the GPU default) on a GPU without
    bfloat16, with one notice. ``gpu_capability`` is None when running on a CPU, where ``resolve_dtype``
    already falls back to float32."""
    if gpu_capability is None or tuple(gpu_capability) >= BF16_MIN_CAPABILITY or requested not in (None, "bfloat16"):
        return requested
    logger.warning(
        "this GPU (compute capability %d.%d) has no bfloat16 arithmetic; computing in float16 "
        "(pass --dtype float32 for full precision)", *gpu_capability,
    )
    return "float16"


def _gpu_capability() -> Optional[Tuple[int, int]]:
    import paddle

    if not (paddle.device.is_compiled_with_cuda() and paddle.device.get_device().startswith("gpu")):
        return None
    return tuple(paddle.device.cuda.get_device_capability())


def load_model(args: argparse.Namespace):
    """The model of the parsed model flags (``add_model_args``)."""
    from .models.deepseek_vl2 import DeepseekVLV2ForCausalLM

    check_checkpoint_dir(args.model_path)
    return DeepseekVLV2ForCausalLM.from_pretrained(
        args.model_path, dtype=choose_dtype(args.dtype, _gpu_capability()), weight_dtype=args.weight_dtype,
        map_weights=args.map_weights,
    )


@dataclass
class Answer:
    """One generated answer.

    text: the decoded answer without the final end-of-sentence token; finished: it ended with that token;
    token_ids: every generated id, the end-of-sentence id included; eos_text: that token's text;
    prompt_tokens: the prompt's length; seconds: wall time of image encoding, prefill and decoding;
    first_token_seconds: of which until the first new token (image encoding and prefill). Answers generated
    together as a batch carry the batch's times.
    """

    text: str
    finished: bool
    token_ids: List[int]
    eos_text: str
    prompt_tokens: int
    seconds: float
    first_token_seconds: Optional[float] = None

    def timing(self) -> str:
        return generation_timing(len(self.token_ids), self.seconds, self.first_token_seconds)

    @property
    def official_text(self) -> str:
        """The answer as the official scripts print it: special tokens kept, the end-of-sentence included."""
        return self.text + (self.eos_text if self.finished else "")


def generation_timing(count: int, seconds: float, first_token_seconds: Optional[float],
                      unit: str = "new token") -> str:
    """"N new tokens in S s: the first after F s, then R tokens/s": the time to the first token is the
    images and the prompt, the rate after it the decoding, which users compare (one figure mixing both
    says little about either). ``unit`` names what is counted ("step" for a batch's steps)."""
    line = f"{count} {unit}{'s' if count != 1 else ''} in {seconds:.2f} s"
    if first_token_seconds is None:
        return line
    line += f": the first after {first_token_seconds:.2f} s"
    decoding = seconds - first_token_seconds
    if count > 1 and decoding > 0:
        line += f", then {(count - 1) / decoding:.1f} {unit.split()[-1]}s/s"
    return line


class _FirstStep:
    """A step callback timing the generation: when it started, when the first step came (``first``)."""

    def __init__(self):
        self.start, self.first = time.perf_counter(), None

    def __call__(self, token) -> None:
        if self.first is None:
            wait = getattr(token, "numpy", None)
            if wait is not None:
                wait()  # on a GPU the step may still be queued: the time is when the token exists
            self.first = time.perf_counter() - self.start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def generate_answer(model, processor, inputs, config, stream: Optional[TextIO] = None) -> Answer:
    """Generate for one processed prompt (a batch of one); with ``stream``, write the text there as it comes.

    The streamed text is exactly ``Answer.text``: the end-of-sentence token is held back in both modes.
    """
    eos_id = processor.eos_id
    eos_text = processor.decode([eos_id])
    first_step = _FirstStep()
    if stream is None:
        token_ids = model.generate(**inputs, config=config, on_step=first_step)[0].tolist()
        finished = bool(token_ids) and token_ids[-1] == eos_id
        text = processor.decode(token_ids[:-1] if finished else token_ids)
    else:
        token_ids, pieces = [], []

        def on_token(token_id: int) -> None:
            first_step(token_id)
            token_ids.append(token_id)

        for piece in model.stream_generate(
            processor.tokenizer, **inputs, config=config, on_token=on_token, stop_strings=(eos_text,)
        ):
            stream.write(piece)
            stream.flush()
            pieces.append(piece)
        text = "".join(pieces)
        finished = bool(token_ids) and token_ids[-1] == eos_id
    return Answer(
        text=text, finished=finished, token_ids=token_ids, eos_text=eos_text,
        prompt_tokens=int(inputs.input_ids.shape[1]), seconds=first_step.elapsed(), first_token_seconds=first_step.first,
    )


def status(message: str) -> None:
    """A progress line for the user, on stderr so that stdout holds only the answer."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def answer_one_turn(
    args: argparse.Namespace, content: str, image_paths: Sequence[str], out: Optional[TextIO] = None
) -> Answer:
    """Ask ``content`` about ``image_paths`` and print ``{sft_format} {answer}`` to ``out`` (stdout).

    Uses the flags of ``add_model_args``, ``add_generation_args`` and ``add_output_args``. Everything that
    can fail on the user's input (images, checkpoint files, prompt length, sampling flags) is checked
    before the weights are loaded.
    """
    out = out or sys.stdout
    config = generation_config(args)
    conversation = user_turn(content, image_paths)
    images = load_pil_images(conversation)
    processor = load_processor(args.model_path)
    inputs = processor(conversations=conversation, images=images, force_batchify=True, inference_mode=True,
                       system_prompt="")
    prompt_tokens = int(inputs.input_ids.shape[1])
    check_prompt_fits(prompt_tokens, context_length(args.model_path))
    status(f"prompt: {prompt_tokens} tokens ({len(images)} image(s))")
    model = load_model(args)

    out.write(f"{inputs.sft_format[0]} ")
    answer = generate_answer(model, processor, inputs, config, stream=out if args.stream else None)
    out.write((answer.eos_text if answer.finished else "") if args.stream else answer.official_text)
    out.write("\n")
    if args.show_token_ids:
        out.write("token ids: " + " ".join(str(token) for token in answer.token_ids) + "\n")
    out.flush()
    status(f"answer: {answer.timing()}")
    return answer


def answer_each(
    args: argparse.Namespace, contents: Sequence[str], image_paths: Sequence[Sequence[str]], out: Optional[TextIO] = None
) -> List[Answer]:
    """Ask ``contents[i]`` about ``image_paths[i]``, one conversation each, generated together as one
    left-padded batch; print ``{sft_format} {answer}`` per conversation, in order, to ``out`` (stdout).

    Every conversation gets the answer it would get alone (greedy; sampling draws per row). Streaming
    is for one conversation: ``--stream`` is refused here.
    """
    from .generation import split_at_eos

    out = out or sys.stdout
    if args.stream:
        raise CLIInputError("--stream prints one answer as it comes: ask one conversation (give an image or --question)")
    config = generation_config(args)
    conversations = [user_turn(content, paths) for content, paths in zip(contents, image_paths)]
    images = [load_pil_images(conversation) for conversation in conversations]
    processor = load_processor(args.model_path)
    samples = [
        processor.process_one(conversations=conversation, images=row_images, inference_mode=True, system_prompt="")
        for conversation, row_images in zip(conversations, images)
    ]
    inputs = processor.batchify(samples)
    prompt_tokens = int(inputs.input_ids.shape[1])
    check_prompt_fits(prompt_tokens, context_length(args.model_path))
    status(f"prompts: {len(samples)} conversations of up to {prompt_tokens} tokens")
    model = load_model(args)
    eos_id = processor.eos_id
    eos_text = processor.decode([eos_id])
    first_step = _FirstStep()
    rows = model.generate(**inputs, config=config, on_step=first_step).tolist()
    seconds = first_step.elapsed()
    answers = []
    for sample, token_ids in zip(samples, rows):
        answer_ids, finished = split_at_eos(token_ids, eos_id)
        answer = Answer(text=processor.decode(answer_ids), finished=finished,
                        token_ids=answer_ids + [eos_id] * finished, eos_text=eos_text,
                        prompt_tokens=len(sample.input_ids), seconds=seconds, first_token_seconds=first_step.first)
        out.write(f"{sample.sft_format} {answer.official_text}\n")
        if args.show_token_ids:
            out.write("token ids: " + " ".join(str(token) for token in answer.token_ids) + "\n")
        answers.append(answer)
    out.flush()
    status(f"answers: {sum(len(a.token_ids) for a in answers)} new tokens for {len(answers)} conversations, "
           + generation_timing(len(rows[0]), seconds, first_step.first, unit="step"))
    return answers


def user_errors() -> tuple:
    """The exception types that mean bad input rather than a bug: reported in one line, no traceback."""
    from .generation import PromptTooLongError
    from .models.deepseek_vl2 import CheckpointError, ConfigError, ImageInputError
    from .processors import (
        ImageLoadError, ProcessorConfigError, ProcessorInputError, TokenizerFileError, UnknownTemplateError,
        UnknownTokenError,
    )
    from .sampling import SamplingConfigError

    return (
        OSError, CLIInputError, CheckpointError, ConfigError, ImageInputError, ImageLoadError, ProcessorConfigError,
        ProcessorInputError, PromptTooLongError, SamplingConfigError, TokenizerFileError, UnknownTemplateError,
        UnknownTokenError,
    )


def error_line(err: BaseException) -> str:
    message = " ".join(str(err).split()) or type(err).__name__
    return f"error: {message}"


def run_cli(
    main: Callable[[argparse.Namespace], int],
    parse_args: Callable[[Optional[Sequence[str]]], argparse.Namespace],
    argv: Optional[Sequence[str]] = None,
) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run ``main`` and return its exit code.

    Bad input (``user_errors()``) -> ``error: ...`` on stderr and 2; Ctrl-C -> 130; anything else is a bug
    and keeps its traceback.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)

    def job() -> int:
        import_paddle_quietly()
        return main(args)

    return call_reporting_errors(job, user_errors)


def call_reporting_errors(job: Callable[[], int], input_errors: Callable[[], tuple]) -> int:
    """``job()``'s exit code; an exception of the types ``input_errors()`` returns -> ``error: ...`` on stderr
    and 2; Ctrl-C -> 130; anything else is a bug and keeps its traceback. (``input_errors`` is called only
    on failure: the error types' modules import Paddle, which ``job`` imports quietly first.)"""
    try:
        return job()
    except PaddleVersionError as err:  # before input_errors(), whose modules need Paddle
        sys.stderr.write(error_line(err) + "\n")
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.write("\ninterrupted\n")
        return EXIT_INTERRUPTED
    except Exception as err:
        if not isinstance(err, input_errors()):
            raise
        sys.stdout.flush()
        sys.stderr.write(error_line(err) + "\n")
        return EXIT_INPUT_ERROR


def finetune_main() -> int:
    """The ``paddlemix-vl2-finetune`` program, ``finetune.cli.main``: its modules import Paddle as they load,
    so they are loaded once Paddle is found usable (else one error line and exit 2, as everywhere)."""
    return _finetune_program("main")


def lora_merge_main() -> int:
    """The ``paddlemix-vl2-lora-merge`` program, ``finetune.cli.merge_main``, loaded as ``finetune_main``."""
    return _finetune_program("merge_main")


def _finetune_program(name: str) -> int:
    def job() -> int:
        import_paddle_quietly()
        from .finetune import cli as finetune_cli

        return getattr(finetune_cli, name)()

    return call_reporting_errors(job, lambda: ())


def import_paddle_quietly() -> None:
    """Import Paddle (``require_paddle``: a missing or too old one is a ``PaddleVersionError``) without its
    import-time chatter: a ccache warning for people building C++ extensions and an OMP_NUM_THREADS notice
    for data-parallel training. Anything else it prints is passed on."""
    captured = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No ccache found")
            with contextlib.redirect_stderr(captured):
                require_paddle()
    finally:
        for line in captured.getvalue().splitlines(keepends=True):
            if not line.startswith(_PADDLE_IMPORT_NOTICES):
                sys.stderr.write(line)
