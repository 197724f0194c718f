"""Multi-turn chat with DeepSeek-VL2 on stdin / stdout.

Each line is a message; the whole conversation so far goes back to the model every turn. Commands:

* ``/image PATH`` attaches an image to the next message (repeat for several; ``--image_file`` attaches
  images to the first message);
* ``/reset`` forgets the conversation and the attached images;
* ``/quit`` (or the end of the input) leaves.

Messages without images are text-only turns. A message with ``k`` attached images becomes the user turn
``<image>\\n`` × k followed by the text. Answers are streamed to stdout as ``<|Assistant|>: {answer}``;
notes and errors go to stderr, and an error ends only the turn it happened in. Sampling follows the
official ``inference.py`` (temperature 0.4, top_p 0.9, repetition penalty 1.1); ``--greedy`` turns it off.
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterator, List, Optional, Sequence, TextIO

from ..cli import (
    ASSISTANT_ROLE, CHAT_DEFAULTS, EXIT_INPUT_ERROR, USER_ROLE, Answer, CLIArgumentParser, add_generation_args,
    add_model_args, check_prompt_fits, context_length, error_line, generate_answer, generation_config, load_model,
    load_processor, open_images, run_cli, status, user_errors,
)

__all__ = ["ChatSession", "build_parser", "chat_loop", "cli", "main", "parse_args"]

HELP = "commands: /image PATH (attach an image to your next message), /reset (start over), /quit"
CHAT_PROMPT_ADVICE = "the message was not sent; /reset starts a new conversation"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = CLIArgumentParser(prog=prog, description="Chat with DeepSeek-VL2 about images, turn by turn.",
                               epilog=HELP)
    add_model_args(parser)
    group = parser.add_argument_group("input")
    group.add_argument("--image_file", action="append", default=None,
                       help="attach an image to the first message; repeat for more")
    add_generation_args(parser, CHAT_DEFAULTS)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


class ChatSession:
    """The conversation so far, its images, and the images attached to the next message."""

    def __init__(self, model, processor, config, context: int):
        self.model, self.processor, self.config, self.context = model, processor, config, context
        self.messages: List[dict] = []
        self.images: list = []
        self.pending: list = []

    def attach(self, images: list) -> None:
        self.pending.extend(images)

    def reset(self) -> None:
        self.messages, self.images, self.pending = [], [], []

    def ask(self, text: str, out: TextIO) -> Answer:
        """Stream the answer to ``text`` (with the attached images) to ``out`` and add the turn to the history.

        If the turn cannot be prepared (e.g. the prompt is too long), nothing is written, the history stays
        as it was and the attached images are dropped.
        """
        user = {"role": USER_ROLE, "content": "<image>\n" * len(self.pending) + text}
        images = self.images + self.pending
        self.pending = []
        conversation = self.messages + [user, {"role": ASSISTANT_ROLE, "content": ""}]
        inputs = self.processor(conversations=conversation, images=images, force_batchify=True, inference_mode=True,
                                system_prompt="")
        check_prompt_fits(int(inputs.input_ids.shape[1]), self.context, CHAT_PROMPT_ADVICE)
        out.write(f"{ASSISTANT_ROLE}: ")
        answer = generate_answer(self.model, self.processor, inputs, self.config, stream=out)
        out.write("\n")
        out.flush()
        # The model may write the image tag as an ordinary token; in the history it would count as an image
        # placeholder and the processor would refuse every later turn.
        saved = answer.text.replace(self.processor.image_token, "")
        self.messages += [user, {"role": ASSISTANT_ROLE, "content": saved}]
        self.images = images
        return answer


def _lines(stream: TextIO, interactive: bool) -> Iterator[str]:
    while True:
        if interactive:
            try:
                yield input(f"{USER_ROLE}: ")
            except EOFError:
                return
        else:
            line = stream.readline()
            if not line:
                return
            yield line


def chat_loop(session: ChatSession, lines: Iterator[str], out: TextIO) -> int:
    """Run the conversation over ``lines`` until ``/quit`` or their end. Returns the exit code: 0, or
    ``EXIT_INPUT_ERROR`` when a turn failed (its error is printed and the conversation goes on), so that a
    script piping questions in learns that some went unanswered."""
    errors = user_errors()
    failed = False
    for line in lines:
        text = line.strip()
        if not text:
            continue
        command, _, argument = text.partition(" ")
        try:
            if command == "/quit":
                break
            elif command == "/reset":
                session.reset()
                status("(conversation cleared)")
            elif command == "/image":
                path = argument.strip().strip("'\"")
                if not path:
                    status("usage: /image PATH")
                    failed = True
                    continue
                session.attach(open_images([path]))
                status(f"(attached {path} to your next message)")
            elif command in ("/help", "/?"):
                status(HELP)
            elif command.startswith("/"):
                status(f"unknown command {command}; {HELP}")
                failed = True
            else:
                answer = session.ask(text, out)
                status(f"({answer.prompt_tokens} prompt tokens; {answer.timing()})")
        except errors as err:
            status(error_line(err))
            failed = True
    return EXIT_INPUT_ERROR if failed else 0


def main(args: argparse.Namespace) -> int:
    config = generation_config(args)
    first_images = open_images(args.image_file or [])
    processor = load_processor(args.model_path)
    context = context_length(args.model_path)
    model = load_model(args)
    session = ChatSession(model, processor, config, context)
    session.attach(first_images)
    interactive = sys.stdin.isatty()
    if interactive:
        status(HELP)
    return chat_loop(session, _lines(sys.stdin, interactive), sys.stdout)


def cli(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    return run_cli(main, lambda arguments: parse_args(arguments, prog), argv)
