"""DeepSeek-VL2 grounding output: parse it, convert its boxes to pixels, draw them.

The model answers a referring prompt (``<image>\\n<|ref|>{query}<|/ref|>.``) or a grounded conversation
(``<|grounding|>{question}``) with text such as::

    <|ref|>the cat<|/ref|><|det|>[[x1, y1, x2, y2], [x1, y1, x2, y2]]<|/det|><｜end▁of▁sentence｜>

Coordinates are integers in 0..999, relative to the original image. This module uses one convention
in both directions: ``(x1, y1)`` is the top-left pixel edge and ``(x2, y2)`` the bottom-right pixel edge
(exclusive), so ``pixel = v / 999 * W`` for x (``H`` for y) and ``v = round(pixel / W * 999)``.

Model output is never evaluated as Python: ``parse_grounding`` tokenises numbers and brackets itself and
skips, with a ``GroundingParseWarning``, every box it cannot trust.
"""
from __future__ import annotations

import colorsys
import os
import re
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COORDINATE_MAX",
    "GroundedObject",
    "GroundingParseWarning",
    "parse_grounding",
    "format_grounding",
    "box_from_pixels",
    "boxes_to_pixels",
    "draw_boxes",
    "save_png",
]

COORDINATE_MAX = 999

REF_OPEN, REF_CLOSE = "<|ref|>", "<|/ref|>"
DET_OPEN, DET_CLOSE = "<|det|>", "<|/det|>"

# Any special token ends a ref or det block: the ASCII-bar tags (<|ref|>, <|grounding|>, <|User|>) and the
# fullwidth-bar ones (<｜end▁of▁sentence｜>), so a missing closing tag cannot swallow the rest of the text.
_SPECIAL_TOKEN = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜<>\s]{1,40}｜>")
_DET_TOKEN = re.compile(r"(?P<number>-?\d+(?:\.\d+)?)|(?P<open>\[)|(?P<close>\])|(?P<sep>[,\s]+)")

IntBox = Tuple[int, int, int, int]
PixelBox = Tuple[float, float, float, float]


class GroundingParseWarning(UserWarning):
    """A part of the model's grounding output was malformed and has been skipped."""


@dataclass
class GroundedObject:
    """One ``<|det|>`` block (or one ``<|ref|>`` that has none).

    ``label`` is the ``<|ref|>`` text, stripped; ``""`` when the ``<|det|>`` has no ``<|ref|>`` before it.
    ``boxes`` holds ``(x1, y1, x2, y2)`` in 0..999; empty when the block had no usable box.
    """

    label: str
    boxes: List[IntBox] = field(default_factory=list)


def parse_grounding(text: str) -> List[GroundedObject]:
    """Extracts the labelled boxes of a grounding answer, in order of appearance.

    Text outside ``<|ref|>``/``<|det|>`` blocks is ignored. A ``<|det|>`` belongs to the last ``<|ref|>``
    before it that has no ``<|det|>`` yet. A block missing its closing tag ends at the next special token
    or at the end of the text. A box is kept only if it is a bracketed list of exactly four integers in
    0..999 with ``x1 <= x2`` and ``y1 <= y2``; anything else is skipped with a ``GroundingParseWarning``
    while the other boxes of the same block are kept.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_grounding expects the decoded text as str, got {type(text).__name__}")
    objects: List[GroundedObject] = []
    problems: List[str] = []
    open_ref: Optional[GroundedObject] = None
    tokens = list(_SPECIAL_TOKEN.finditer(text))
    for index, token in enumerate(tokens):
        tag = token.group()
        if tag not in (REF_OPEN, DET_OPEN):
            continue
        body_end = tokens[index + 1].start() if index + 1 < len(tokens) else len(text)
        closing = tokens[index + 1].group() if index + 1 < len(tokens) else None
        body = text[token.end():body_end]
        if tag == REF_OPEN:
            _check_closed(closing, REF_CLOSE, body, problems)
            if open_ref is not None:
                problems.append(f"ref {open_ref.label!r} has no {DET_OPEN} block")
            open_ref = GroundedObject(label=body.strip())
            objects.append(open_ref)
        else:
            _check_closed(closing, DET_CLOSE, body, problems)
            if open_ref is None:
                open_ref = GroundedObject(label="")
                objects.append(open_ref)
            open_ref.boxes.extend(_parse_det_body(body, problems))
            open_ref = None
    if open_ref is not None:
        problems.append(f"ref {open_ref.label!r} has no {DET_OPEN} block")
    for problem in problems:
        warnings.warn(problem, GroundingParseWarning, stacklevel=2)
    return objects


def format_grounding(label: str, boxes: Sequence[IntBox]) -> str:
    """The model's answer format: ``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>``."""
    inner = ", ".join("[" + ", ".join(str(int(v)) for v in box) + "]" for box in boxes)
    return f"{REF_OPEN}{label}{REF_CLOSE}{DET_OPEN}[{inner}]{DET_CLOSE}"


def box_from_pixels(box_px: Sequence[float], width: int, height: int) -> IntBox:
    """Pixel-edge box ``(x1, y1, x2, y2)`` (x2, y2 exclusive) -> 0..999 grounding coordinates.

    ``round(x / width * 999)`` and ``round(y / height * 999)``; the inverse of ``boxes_to_pixels`` to within
    half a grounding step (``0.5 * width / 999`` pixels).
    """
    _check_size(width, height)
    x1, y1, x2, y2 = box_px
    return (
        round(x1 / width * COORDINATE_MAX),
        round(y1 / height * COORDINATE_MAX),
        round(x2 / width * COORDINATE_MAX),
        round(y2 / height * COORDINATE_MAX),
    )


def boxes_to_pixels(boxes: Iterable[Sequence[int]], width: int, height: int) -> List[PixelBox]:
    """0..999 boxes -> pixel-edge boxes of a ``width`` x ``height`` image: ``v / 999 * width`` (x), ``* height`` (y).

    Returns floats; round them to get integer pixel edges.
    """
    _check_size(width, height)
    scale_x, scale_y = width / COORDINATE_MAX, height / COORDINATE_MAX
    pixel_boxes = []
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"a box needs 4 coordinates (x1, y1, x2, y2), got {len(box)}: {tuple(box)}")
        x1, y1, x2, y2 = box
        pixel_boxes.append((x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y))
    return pixel_boxes


def draw_boxes(
    image: Image.Image,
    objects: Sequence[GroundedObject],
    line_width: int = 3,
    font_size: Optional[int] = None,
) -> Image.Image:
    """Returns an RGB copy of ``image`` with each object's boxes outlined and labelled.

    Each distinct label gets its own colour (in order of first appearance). The outline of a box covers
    the pixels from ``round(x1)`` to ``round(x2) - 1`` (pixel edges as in ``boxes_to_pixels``), drawn
    inwards ``line_width`` pixels; the label sits on a filled tag just above the box, or inside its top
    edge when there is no room above. ``font_size=None`` uses Pillow's default font size.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"draw_boxes expects a PIL.Image.Image, got {type(image).__name__}")
    if line_width < 1:
        raise ValueError(f"line_width must be at least 1, got {line_width}")
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default() if font_size is None else ImageFont.load_default(size=font_size)
    colours = _label_colours(obj.label for obj in objects)
    width, height = canvas.size
    for obj in objects:
        colour = colours[obj.label]
        for x1, y1, x2, y2 in boxes_to_pixels(obj.boxes, width, height):
            left, top = _clamp(round(x1), width - 1), _clamp(round(y1), height - 1)
            right = max(left, _clamp(round(x2) - 1, width - 1))
            bottom = max(top, _clamp(round(y2) - 1, height - 1))
            draw.rectangle((left, top, right, bottom), outline=colour, width=line_width)
            if obj.label:
                _draw_label(draw, obj.label, (left, top), colour, font)
    return canvas


def save_png(image: Image.Image, path: str) -> None:
    """Writes ``image`` as PNG to ``path`` atomically: a temporary file in the same folder, then ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save {path!r}: folder {folder!r} does not exist; create it first")
    # os.open with 0o666 rather than mkstemp, whose file is private (0600) whatever the umask says.
    temporary = os.path.join(folder, f".tmp-{secrets.token_hex(8)}.png")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _parse_det_body(body: str, problems: List[str]) -> List[IntBox]:
    """Collects the innermost bracketed lists of a det body and keeps the valid boxes among them.

    Either bracket ends the current list, so ``[[[1, 2, 3, 4]]]`` yields one box and ``[[1, 2, [3, 4]]]``
    two (invalid) lists. Text that is not a number inside a list spoils that list; outside any list it is
    ignored. A list still open at the end of the body is dropped, since its last number may be cut off.
    """
    boxes: List[IntBox] = []
    items: List[str] = []
    corrupt = False
    list_open = False
    position = 0
    while position < len(body):
        match = _DET_TOKEN.match(body, position)
        if match is None:
            next_position = _next_token_start(body, position)
            junk = body[position:next_position]
            if list_open:
                items.append(junk)
                corrupt = True
            else:
                problems.append(f"ignoring unexpected text {junk!r} outside the box lists of a {DET_OPEN} block")
            position = next_position
            continue
        position = match.end()
        if match.group("number") is not None:
            items.append(match.group("number"))
        elif match.group("open") is not None or match.group("close") is not None:
            if items:
                box = _validate_box(items, corrupt, problems)
                if box is not None:
                    boxes.append(box)
            items, corrupt = [], False
            list_open = match.group("open") is not None
    if items:
        problems.append(f"skipping box '[{', '.join(items)}': its list is not closed by ']'")
    return boxes


def _next_token_start(body: str, position: int) -> int:
    for end in range(position + 1, len(body)):
        if _DET_TOKEN.match(body, end) is not None:
            return end
    return len(body)


def _validate_box(numbers: List[str], corrupt: bool, problems: List[str]) -> Optional[IntBox]:
    shown = "[" + ", ".join(numbers) + "]"
    if corrupt:
        problems.append(f"skipping box {shown}: it contains text that is not a number")
        return None
    if len(numbers) != 4:
        problems.append(f"skipping box {shown}: it has {len(numbers)} number(s) instead of 4 (x1, y1, x2, y2)")
        return None
    if any("." in number for number in numbers):
        problems.append(f"skipping box {shown}: coordinates must be integers")
        return None
    x1, y1, x2, y2 = (int(number) for number in numbers)
    if not all(0 <= v <= COORDINATE_MAX for v in (x1, y1, x2, y2)):
        problems.append(f"skipping box {shown}: coordinates must lie in 0..{COORDINATE_MAX}")
        return None
    if x2 < x1 or y2 < y1:
        problems.append(f"skipping box {shown}: x2 < x1 or y2 < y1")
        return None
    return (x1, y1, x2, y2)


def _check_closed(closing: Optional[str], expected: str, body: str, problems: List[str]) -> None:
    if closing != expected:
        end = closing or "the end of the text"
        problems.append(f"{expected} missing after {body.strip()[:40]!r}; the block ends at {end}")


def _label_colours(labels: Iterable[str]) -> Dict[str, Tuple[int, int, int]]:
    ordered = list(dict.fromkeys(labels))
    # Golden-ratio hue steps keep any number of labels apart; saturation/value keep them dark enough
    # for white label text.
    colours = {}
    for rank, label in enumerate(ordered):
        hue = (rank * 0.618033988749895) % 1.0
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.85)
        colours[label] = (round(red * 255), round(green * 255), round(blue * 255))
    return colours


def _draw_label(draw: ImageDraw.ImageDraw, label: str, corner: Tuple[int, int], colour, font) -> None:
    left, top = corner
    text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), label, font=font)
    tag_width, tag_height = text_right - text_left + 4, text_bottom - text_top + 4
    tag_top = top - tag_height if top >= tag_height else top
    draw.rectangle((left, tag_top, left + tag_width - 1, tag_top + tag_height - 1), fill=colour)
    draw.text((left + 2 - text_left, tag_top + 2 - text_top), label, font=font, fill=(255, 255, 255))


def _clamp(value: int, upper: int) -> int:
    return min(max(value, 0), upper)


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
