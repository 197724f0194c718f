"""Accuracy of a checkpoint on fresh synthetic-shapes images, for every question type.

``make_eval_items(n_images, seed)`` draws ``n_images`` scenes with ``shapes.draw_scene`` and asks every
question the scene allows (``conversations.scene_questions``: the shape on one-shape images, the colour
of every shape kind that occurs once, the count, and the box of every shape), one question per prompt.

``evaluate`` answers them with greedy decoding in batches (prompts of one kind together, so short
answers stop early) and scores shape/colour/count answers by exact match and grounding answers by
``IoU >= 0.5`` between the first parsed box (``paddlemix_vl2.grounding``) and the true pixel box.

Run ``python -m paddlemix_vl2.demo.evaluate --n 100 --seed 7`` to print the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import paddle
from PIL import Image

from ..cli import CLIArgumentParser
from ..generation import split_at_eos
from ..grounding import GroundingParseWarning, boxes_to_pixels, parse_grounding
from ..models.deepseek_vl2 import DeepseekVLV2ForCausalLM
from ..processors import DeepseekVLV2Processor
from . import DEFAULT_CHECKPOINT
from .conversations import SceneQuestion, scene_questions
from .shapes import ASSISTANT_ROLE, IMAGE_TAG, USER_ROLE, draw_scene

__all__ = [
    "QUESTION_KINDS",
    "load_for_inference",
    "IOU_THRESHOLD",
    "EvalItem",
    "EvalResult",
    "make_eval_items",
    "box_iou",
    "grounding_iou",
    "evaluate",
    "main",
]

logger = logging.getLogger(__name__)

QUESTION_KINDS = ("shape", "color", "count", "grounding")
IOU_THRESHOLD = 0.5
# A grounding answer is about 26 tokens with the demo tokenizer; the margin covers longer tokenizations.
DEFAULT_MAX_NEW_TOKENS = 48

@dataclass(frozen=True)
class EvalItem:
    """One question about one image (``SceneQuestion`` fields plus the image)."""

    image: Image.Image
    question: SceneQuestion

    @property
    def kind(self) -> str:
        return self.question.kind


@dataclass
class EvalResult:
    """Per-kind counts; ``failures`` lists ``(kind, question, expected, answer)`` of every miss."""

    correct: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(QUESTION_KINDS, 0))
    total: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(QUESTION_KINDS, 0))
    failures: List[Tuple[str, str, str, str]] = field(default_factory=list)

    def accuracy(self, kind: str) -> float:
        """Fraction answered right (exact match, or IoU >= 0.5 for grounding); 0.0 when none was asked."""
        return self.correct[kind] / self.total[kind] if self.total[kind] else 0.0

    def to_dict(self) -> Dict[str, Dict[str, float]]:
        return {
            kind: {"accuracy": round(self.accuracy(kind), 4), "correct": self.correct[kind], "total": self.total[kind]}
            for kind in QUESTION_KINDS
        }


def make_eval_items(n_images: int, seed: int) -> List[EvalItem]:
    """The questions of ``n_images`` fresh scenes drawn with ``random.Random(seed)``."""
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    rng = random.Random(seed)
    items: List[EvalItem] = []
    for _ in range(n_images):
        image, shapes = draw_scene(rng)
        items += [EvalItem(image, question) for question in scene_questions(image, shapes)]
    return items


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; 0.0 when the union is empty."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_iou(answer: str, image_size: Tuple[int, int], truth_px: Sequence[float]) -> float:
    """IoU of the first box in a grounding ``answer`` with the true pixel box; 0.0 when it has no valid box."""
    with warnings.catch_warnings():
        # An unparsable box is simply a miss here; the warning would only repeat that.
        warnings.simplefilter("ignore", GroundingParseWarning)
        objects = parse_grounding(answer)
    boxes = [box for obj in objects for box in obj.boxes]
    if not boxes:
        return 0.0
    return box_iou(boxes_to_pixels(boxes[:1], *image_size)[0], truth_px)


def evaluate(
    model: DeepseekVLV2ForCausalLM,
    processor: DeepseekVLV2Processor,
    n_images: int = 100,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> EvalResult:
    """Answer every question of ``make_eval_items(n_images, seed)`` greedily and score the answers.

    The model is switched to eval mode for the run and back to its previous mode afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    items = sorted(make_eval_items(n_images, seed), key=lambda item: QUESTION_KINDS.index(item.kind))
    result = EvalResult()
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            for item, answer in zip(chunk, _answer(model, processor, chunk, max_new_tokens)):
                question = item.question
                if question.kind == "grounding":
                    hit = grounding_iou(answer, item.image.size, question.box_px) >= IOU_THRESHOLD
                else:
                    hit = answer == question.answer
                result.total[question.kind] += 1
                result.correct[question.kind] += int(hit)
                if not hit:
                    result.failures.append((question.kind, question.question, question.answer, answer))
    finally:
        model.train(was_training)
    return result


def _answer(
    model: DeepseekVLV2ForCausalLM, processor: DeepseekVLV2Processor, items: Sequence[EvalItem], max_new_tokens: int
) -> List[str]:
    """Greedy answers of one batch, cut at the end-of-sentence token and stripped."""
    samples = [
        processor.process_one(
            conversations=[
                {"role": USER_ROLE, "content": f"{IMAGE_TAG}\n{item.question.question}"},
                {"role": ASSISTANT_ROLE, "content": ""},
            ],
            images=[item.image],
            inference_mode=True,
        )
        for item in items
    ]
    batch = processor.batchify(samples)
    with paddle.no_grad():
        tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)  # [B, N]
    return [processor.decode(split_at_eos(row, processor.eos_id)[0]).strip() for row in tokens.numpy().tolist()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = CLIArgumentParser(
        prog="python -m paddlemix_vl2.demo.evaluate",
        description="Score a checkpoint on fresh synthetic-shapes images (every question type, greedy answers).",
    )
    parser.add_argument("--model_path", default=DEFAULT_CHECKPOINT, help="checkpoint folder (default: the bundled demo)")
    parser.add_argument("--n", type=int, default=100, help="number of fresh images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh images")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--show_failures", type=int, default=0, help="also print this many wrong answers")
    return parser.parse_args(argv)


def load_for_inference(model_path: str) -> Tuple[DeepseekVLV2ForCausalLM, DeepseekVLV2Processor]:
    """The checkpoint at ``model_path`` in eval mode, and its processor."""
    model = DeepseekVLV2ForCausalLM.from_pretrained(model_path, progress=False)
    model.eval()
    return model, DeepseekVLV2Processor.from_pretrained(model_path)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    """Command-line entry point: prints and returns the per-kind figures."""
    args = parse_args(argv)
    model, processor = load_for_inference(args.model_path)
    result = evaluate(model, processor, args.n, args.seed, args.batch_size, args.max_new_tokens)
    figures = result.to_dict()
    sys.stdout.write(json.dumps(figures, indent=1) + "\n")
    for kind, question, expected, answer in result.failures[: args.show_failures]:
        sys.stdout.write(f"{kind}: {question!r} expected {expected!r} got {answer!r}\n")
    return figures


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
