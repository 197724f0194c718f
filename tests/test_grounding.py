"""Grounding output: parser cases with exact expected objects and warning counts, pixel maths, drawing."""
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from paddlemix_vl2.grounding import (
    GroundedObject,
    GroundingParseWarning,
    box_from_pixels,
    boxes_to_pixels,
    draw_boxes,
    format_grounding,
    parse_grounding,
    save_png,
)

EOS = "<｜end▁of▁sentence｜>"


def G(label, *boxes):
    return GroundedObject(label=label, boxes=list(boxes))


# (id, model output, expected objects, expected number of GroundingParseWarnings)
PARSER_CASES = [
    ("single_box", "<|ref|>the cat<|/ref|><|det|>[[12, 34, 560, 780]]<|/det|>",
     [G("the cat", (12, 34, 560, 780))], 0),
    ("multiple_boxes", "<|ref|>dogs<|/ref|><|det|>[[1, 2, 3, 4], [100, 200, 300, 400], [0, 0, 999, 999]]<|/det|>",
     [G("dogs", (1, 2, 3, 4), (100, 200, 300, 400), (0, 0, 999, 999))], 0),
    ("multiple_refs", "<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|><|ref|>b<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>",
     [G("a", (1, 2, 3, 4)), G("b", (5, 6, 7, 8))], 0),
    ("det_without_ref", "<|det|>[[10, 20, 30, 40]]<|/det|>", [G("", (10, 20, 30, 40))], 0),
    ("second_det_unlabelled", "<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|><|det|>[[5, 6, 7, 8]]<|/det|>",
     [G("a", (1, 2, 3, 4)), G("", (5, 6, 7, 8))], 0),
    ("odd_count_box_skipped_good_kept", "<|ref|>x<|/ref|><|det|>[[1, 2, 3], [10, 20, 30, 40]]<|/det|>",
     [G("x", (10, 20, 30, 40))], 1),
    ("nested_lists", "<|ref|>x<|/ref|><|det|>[[[1, 2, 3, 4]]]<|/det|>", [G("x", (1, 2, 3, 4))], 0),
    ("nested_inside_box", "<|ref|>x<|/ref|><|det|>[[1, 2, [3, 4]]]<|/det|>", [G("x")], 2),
    ("numbers_after_box", "<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4], 5, 6]<|/det|>", [G("x", (1, 2, 3, 4))], 1),
    ("single_bracket", "<|ref|>x<|/ref|><|det|>[1, 2, 3, 4]<|/det|>", [G("x", (1, 2, 3, 4))], 0),
    ("truncated", "<|ref|>x<|/ref|><|det|>[[1, 2, 3", [G("x")], 2),
    ("truncated_after_good_box", "<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4], [5, 6", [G("x", (1, 2, 3, 4))], 2),
    ("five_numbers", "<|ref|>x<|/ref|><|det|>[[0,5,533,17,9999]]<|/det|>", [G("x")], 1),
    ("one_number_trailing_comma", "<|ref|>x<|/ref|><|det|>[[470,]]<|/det|>", [G("x")], 1),
    ("value_above_999", "<|ref|>x<|/ref|><|det|>[[0, 0, 1000, 500], [0, 0, 999, 999]]<|/det|>",
     [G("x", (0, 0, 999, 999))], 1),
    ("negative_value", "<|ref|>x<|/ref|><|det|>[[-5, 10, 20, 30], [5, 10, 20, 30]]<|/det|>",
     [G("x", (5, 10, 20, 30))], 1),
    ("float_value", "<|ref|>x<|/ref|><|det|>[[10.5, 20, 30, 40], [10, 20, 30, 40]]<|/det|>",
     [G("x", (10, 20, 30, 40))], 1),
    ("x2_less_than_x1", "<|ref|>x<|/ref|><|det|>[[500, 10, 400, 30], [400, 10, 500, 30]]<|/det|>",
     [G("x", (400, 10, 500, 30))], 1),
    ("y2_less_than_y1", "<|ref|>x<|/ref|><|det|>[[10, 50, 20, 40]]<|/det|>", [G("x")], 1),
    ("degenerate_box_kept", "<|ref|>x<|/ref|><|det|>[[7, 8, 7, 8]]<|/det|>", [G("x", (7, 8, 7, 8))], 0),
    ("word_inside_box", "<|ref|>x<|/ref|><|det|>[[1, 2, three, 4], [1, 2, 3, 4]]<|/det|>",
     [G("x", (1, 2, 3, 4))], 1),
    ("text_outside_lists", "<|ref|>x<|/ref|><|det|>boxes: [[1, 2, 3, 4]] done<|/det|>", [G("x", (1, 2, 3, 4))], 2),
    ("empty_list", "<|ref|>x<|/ref|><|det|>[]<|/det|>", [G("x")], 0),
    ("empty_det", "<|ref|>x<|/ref|><|det|><|/det|>", [G("x")], 0),
    ("garbage_text", "I could not find it in the image, sorry [maybe].", [], 0),
    ("whitespace_and_newlines", "<|ref|>\n  the dog \n<|/ref|>\n<|det|>[\n  [1 ,2,\n3,\t4 ] ,\n]<|/det|>\n",
     [G("the dog", (1, 2, 3, 4))], 0),
    ("trailing_eos", "<|ref|>the giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>" + EOS,
     [G("the giraffe at the back.", (580, 270, 999, 900))], 0),
    ("missing_det_close_before_eos", "<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4]]" + EOS, [G("x", (1, 2, 3, 4))], 1),
    ("missing_ref_close", "<|ref|>cat<|det|>[[1, 2, 3, 4]]<|/det|>", [G("cat", (1, 2, 3, 4))], 1),
    ("ref_without_det", "<|ref|>cat<|/ref|> is not in the picture." + EOS, [G("cat")], 1),
    ("ref_followed_by_ref", "<|ref|>a<|/ref|><|ref|>b<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>",
     [G("a"), G("b", (1, 2, 3, 4))], 1),
    ("grounded_conversation",
     "<|grounding|>In the picture, <|ref|>a man<|/ref|><|det|>[[10, 20, 300, 900]]<|/det|> is walking "
     "<|ref|>two dogs<|/ref|><|det|>[[400, 600, 550, 990], [600, 610, 760, 995]]<|/det|> along "
     "<|ref|>the beach<|/ref|><|det|>[[0, 500, 999, 999]]<|/det|>." + EOS,
     [G("a man", (10, 20, 300, 900)), G("two dogs", (400, 600, 550, 990), (600, 610, 760, 995)),
      G("the beach", (0, 500, 999, 999))], 0),
]


@pytest.mark.parametrize("text, expected, n_warnings", [c[1:] for c in PARSER_CASES], ids=[c[0] for c in PARSER_CASES])
def test_parse_grounding(text, expected, n_warnings):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objects = parse_grounding(text)
    assert objects == expected
    grounding_warnings = [w for w in caught if issubclass(w.category, GroundingParseWarning)]
    assert len(grounding_warnings) == n_warnings, [str(w.message) for w in grounding_warnings]


def test_warning_names_the_bad_box_and_points_at_the_caller():
    with pytest.warns(GroundingParseWarning, match=r"\[0, 5, 533, 17, 9999\].*5 number") as record:
        parse_grounding("<|det|>[[0,5,533,17,9999]]<|/det|>")
    assert record[0].filename == __file__


def test_parse_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        parse_grounding(b"<|det|>[[1, 2, 3, 4]]<|/det|>")


def test_format_grounding_round_trips_through_the_parser():
    text = format_grounding("the red circle", [(1, 2, 3, 4), (0, 10, 999, 998)])
    assert text == "<|ref|>the red circle<|/ref|><|det|>[[1, 2, 3, 4], [0, 10, 999, 998]]<|/det|>"
    assert parse_grounding(text) == [G("the red circle", (1, 2, 3, 4), (0, 10, 999, 998))]


def test_boxes_to_pixels_matches_hand_computation():
    # x: v / 999 * 640, y: v / 999 * 480. 333/999 = 1/3; 500 * 480 / 999 = 240000 / 999.
    pixels = boxes_to_pixels([(0, 999, 333, 500), (999, 0, 999, 999)], 640, 480)
    assert pixels == [
        pytest.approx((0.0, 480.0, 640 / 3, 240000 / 999), abs=1e-9),
        pytest.approx((640.0, 0.0, 640.0, 480.0), abs=1e-9),
    ]


def test_box_from_pixels_is_the_rounded_inverse():
    # 213/640*999 = 332.48 -> 332; 100/480*999 = 208.125 -> 208; 640 -> 999; 479/480*999 = 996.92 -> 997.
    assert box_from_pixels((213, 100, 640, 479), 640, 480) == (332, 208, 999, 997)
    for box_px in [(0, 0, 1, 1), (17, 33, 250, 199), (300, 2, 639, 480)]:
        back = boxes_to_pixels([box_from_pixels(box_px, 640, 480)], 640, 480)[0]
        assert max(abs(a - b) for a, b in zip(back, box_px)) <= 0.5 * 640 / 999


@pytest.mark.parametrize("width, height", [(0, 10), (10, -1)])
def test_pixel_conversions_reject_bad_sizes(width, height):
    with pytest.raises(ValueError, match="image size must be positive"):
        boxes_to_pixels([(1, 2, 3, 4)], width, height)
    with pytest.raises(ValueError, match="image size must be positive"):
        box_from_pixels((1, 2, 3, 4), width, height)


def test_boxes_to_pixels_rejects_wrong_box_length():
    with pytest.raises(ValueError, match="4 coordinates"):
        boxes_to_pixels([(1, 2, 3)], 100, 100)


BACKGROUND = (200, 200, 200)


def _edges(box, width, height):
    """Independent rounding of the documented convention: pixels round(v/999*W) .. round(x2/999*W) - 1."""
    x1, y1, x2, y2 = box
    return (round(x1 * width / 999), round(y1 * height / 999),
            round(x2 * width / 999) - 1, round(y2 * height / 999) - 1)


def test_drawn_outlines_sit_where_the_coordinates_say(tmp_path):
    width, height, line = 320, 240, 3
    image = Image.new("RGB", (width, height), BACKGROUND)
    objects = [G("cat", (100, 300, 600, 900)), G("dog", (700, 100, 950, 400)), G("cat", (650, 600, 900, 950))]
    drawn = draw_boxes(image, objects, line_width=line)
    assert np.all(np.asarray(image) == BACKGROUND), "the input image must not be modified"
    pixels = np.asarray(drawn)
    outline_colours = []
    for obj in objects:
        left, top, right, bottom = _edges(obj.boxes[0], width, height)
        colour = tuple(pixels[bottom, left])
        assert colour != BACKGROUND
        outline_colours.append(colour)
        ring = np.zeros((height, width), dtype=bool)
        ring[top:bottom + 1, left:right + 1] = True
        ring[top + line:bottom + 1 - line, left + line:right + 1 - line] = False
        assert np.all(pixels[ring] == colour), f"outline of {obj.label} not fully drawn"
        assert np.all(pixels[top + line + 1:bottom - line, left + line + 1:right - line] == BACKGROUND)
        assert np.all(pixels[top:bottom + 1, right + 1] == BACKGROUND), "outline drawn past the right edge"
        assert np.all(pixels[bottom + 1, left:right + 1] == BACKGROUND), "outline drawn past the bottom edge"
        label_tag = pixels[:top, left:right + 1]
        assert np.any(np.all(label_tag == colour, axis=-1)), "label tag missing above the box"
    cat, dog, second_cat = outline_colours
    assert cat == second_cat and cat != dog

    path = os.path.join(tmp_path, "boxes.png")
    save_png(drawn, path)
    assert os.listdir(tmp_path) == ["boxes.png"]
    with Image.open(path) as reloaded:
        assert np.array_equal(np.asarray(reloaded.convert("RGB")), pixels)


def test_draw_handles_edge_boxes_and_unicode_labels():
    image = Image.new("L", (50, 40), 128)
    drawn = draw_boxes(image, [G("猫 café", (0, 0, 999, 999)), G("", (500, 500, 500, 500)), G("none")])
    assert drawn.mode == "RGB" and drawn.size == (50, 40)
    pixels = np.asarray(drawn)
    assert tuple(pixels[39, 0]) != (128, 128, 128) and tuple(pixels[39, 49]) != (128, 128, 128)


def test_draw_rejects_bad_arguments():
    with pytest.raises(TypeError, match="PIL.Image"):
        draw_boxes(np.zeros((4, 4, 3)), [])
    with pytest.raises(ValueError, match="line_width"):
        draw_boxes(Image.new("RGB", (4, 4)), [], line_width=0)


def test_save_png_needs_an_existing_folder(tmp_path):
    missing = os.path.join(tmp_path, "no_such_folder", "out.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_png(Image.new("RGB", (4, 4)), missing)


def test_save_png_replaces_an_existing_file(tmp_path):
    path = os.path.join(tmp_path, "out.png")
    save_png(Image.new("RGB", (4, 4), (1, 2, 3)), path)
    save_png(Image.new("RGB", (6, 5), (9, 8, 7)), path)
    assert os.listdir(tmp_path) == ["out.png"]
    with Image.open(path) as reloaded:
        assert reloaded.size == (6, 5) and reloaded.getpixel((0, 0)) == (9, 8, 7)
