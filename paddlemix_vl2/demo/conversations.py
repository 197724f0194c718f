"""Every question a synthetic-shapes scene allows, and multi-question training conversations.

``scene_questions`` lists, for one scene of ``shapes.draw_scene``, the questions of the task with their
exact answers (the same texts as ``shapes.make_example``):

* ``What shape is in the image?`` on one-shape images;
* ``What color is the {shape}?`` for every shape kind that occurs exactly once;
* ``How many shapes are there?``;
* ``<|ref|>the {color} {shape}<|/ref|>.`` for every shape.

``write_conversation_dataset`` writes the demo model's training set: one record per image holding several
of that image's questions as consecutive user/assistant turns, the image tag in the first user turn
(``<image>\n{question}``, one image per conversation). Compared with one question per image this gives
several answers for one pass of the vision tower, which is where much of the training time goes.

The questions of one conversation must not give each other's answers away, or the language model learns
to read them off the text instead of looking at the image: a grounding prompt names a shape's colour and
kind (the answer to "What color is the {shape}?" and, on one-shape images, to "What shape is in the
image?"), the groundings together enumerate the shapes (the count), the shape question is only ever
asked on one-shape images (so it gives away the count). ``training_questions`` therefore keeps the order
count, shape, colours, groundings, and asks a random subset (``ASK_PROBABILITY``) so every kind also
comes first, as it does when a user asks it alone.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from ..grounding import box_from_pixels, format_grounding
from .shapes import (
    ASSISTANT_ROLE,
    IMAGE_TAG,
    SHAPE_KINDS,
    USER_ROLE,
    Shape,
    draw_scene,
    write_image_records,
)

__all__ = [
    "SceneQuestion", "scene_questions", "training_questions", "conversation_record", "write_conversation_dataset",
]


@dataclass(frozen=True)
class SceneQuestion:
    """One question about a scene: ``kind`` in shape/color/count/grounding, the exact ``answer``, and for
    grounding the true pixel-edge box ``box_px``."""

    kind: str
    question: str
    answer: str
    box_px: Optional[Tuple[int, int, int, int]] = None


def scene_questions(image: Image.Image, shapes: Sequence[Shape]) -> List[SceneQuestion]:
    """Every question the scene allows, in a fixed order (shape, colours, count, groundings)."""
    kind_counts = {kind: sum(shape.shape == kind for shape in shapes) for kind in SHAPE_KINDS}
    questions = []
    if len(shapes) == 1:
        questions.append(SceneQuestion("shape", "What shape is in the image?", shapes[0].shape))
    for shape in shapes:
        if kind_counts[shape.shape] == 1:
            questions.append(SceneQuestion("color", f"What color is the {shape.shape}?", shape.color))
    questions.append(SceneQuestion("count", "How many shapes are there?", str(len(shapes))))
    for shape in shapes:
        label = f"the {shape.color} {shape.shape}"
        answer = format_grounding(label, [box_from_pixels(shape.box_px, *image.size)])
        questions.append(SceneQuestion("grounding", f"<|ref|>{label}<|/ref|>.", answer, shape.box_px))
    return questions


# Order of the kinds within a training conversation: no answer can be read off an earlier turn.
_LEAK_FREE_ORDER = {"count": 0, "shape": 1, "color": 2, "grounding": 3}
# Chance that each question of a scene is asked in its training conversation, by kind. Grounding is
# asked less: the presence-only tower keeps too little position for the boxes to be learnt (README.md), so
# its answers teach the format and little else; at 0.6 they were 43% of the answers, each weighing as much
# in the loss as an answer the model can learn.
ASK_PROBABILITY = {"shape": 0.6, "color": 0.6, "count": 0.6, "grounding": 0.2}


def training_questions(questions: Sequence[SceneQuestion], rng: random.Random) -> List[SceneQuestion]:
    """A random non-empty subset of ``questions`` in the leak-free order (count, shape, colours,
    groundings; the colours and the groundings each in random order)."""
    shuffled = list(questions)
    rng.shuffle(shuffled)
    shuffled.sort(key=lambda question: _LEAK_FREE_ORDER[question.kind])
    asked = [question for question in shuffled if rng.random() < ASK_PROBABILITY[question.kind]]
    return asked or [rng.choice(shuffled)]


def conversation_record(questions: Sequence[SceneQuestion], image_path: str) -> Dict[str, Any]:
    """The fine-tune record asking ``questions`` in order about the image at ``image_path``."""
    messages = []
    for index, question in enumerate(questions):
        user: Dict[str, Any] = {"role": USER_ROLE, "content": question.question}
        if index == 0:
            user = {"role": USER_ROLE, "content": f"{IMAGE_TAG}\n{question.question}", "images": [image_path]}
        messages += [user, {"role": ASSISTANT_ROLE, "content": question.answer}]
    return {"messages": messages}


def write_conversation_dataset(out_dir: str, n: int, seed: int) -> str:
    """Writes ``n`` images to ``out_dir/images/000001.png ...`` and one conversation per image
    (``training_questions``) to ``out_dir/train.jsonl``; returns the JSONL path.

    The files depend only on ``n`` and ``seed``; each file is written under a temporary name first.
    """

    def draw(rng: random.Random) -> Tuple[Image.Image, Callable[[str], Dict[str, Any]]]:
        image, shapes = draw_scene(rng)
        questions = training_questions(scene_questions(image, shapes), rng)
        return image, lambda image_path: conversation_record(questions, image_path)

    return write_image_records(out_dir, n, seed, draw)
