"""Stage 1 of the demo recipe: presence labels, patch boxes, the on-the-fly scenes and the head."""
import random

import numpy as np
from PIL import ImageOps

from paddlemix_vl2.demo import DEFAULT_CHECKPOINT
from paddlemix_vl2.demo.shapes import COLORS, Shape, draw_scene
from paddlemix_vl2.demo.vision_pretraining import (
    BOX_LOSS_WEIGHT,
    PRESENCE_LABELS,
    PresenceHead,
    SceneImages,
    collate,
    patch_boxes,
    presence_labels,
    presence_loss,
)
from paddlemix_vl2.grounding import box_from_pixels
from paddlemix_vl2.models.deepseek_vl2 import DeepseekVLV2ForCausalLM
from paddlemix_vl2.processors import DeepseekVLV2Processor


def test_presence_labels_name_every_pair_shape_and_colour_of_the_scene():
    shapes = [Shape("circle", "red", (0, 0, 10, 10)), Shape("square", "blue", (20, 20, 30, 30)),
              Shape("circle", "blue", (40, 40, 50, 50))]
    on = {label for label, value in zip(PRESENCE_LABELS, presence_labels(shapes)) if value == 1}
    assert on == {"red circle", "blue square", "blue circle", "circle", "square", "red", "blue"}
    assert len(PRESENCE_LABELS) == 12 + 3 + 4 and len(set(PRESENCE_LABELS)) == len(PRESENCE_LABELS)


def test_patch_boxes_by_hand_on_a_square_image():
    # 384 x 384: the view is the image itself, patch (r, c) has its centre at (24 c + 12, 24 r + 12).
    square = Shape("square", "blue", (48, 24, 96, 72))  # holds the centres of rows 1-2, columns 2-3
    boxes, on_shape = patch_boxes([square], 384, 384, 384, 24)
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[1:3, 2:4] = 1
    np.testing.assert_array_equal(on_shape.reshape(16, 16), expected)
    grid = boxes.reshape(16, 16, 4)
    np.testing.assert_allclose(grid[2, 3] * 999, box_from_pixels(square.box_px, 384, 384), rtol=1e-6)
    assert not grid[expected == 0].any()


def test_patch_boxes_follow_the_letterboxed_view():
    # Wherever the processor's global view shows a shape colour under a patch centre, the patch has the
    # box of a shape of that colour; wide and tall images are letterboxed differently.
    checked = 0
    for seed in range(60):
        image, shapes = draw_scene(random.Random(seed))
        boxes, on_shape = patch_boxes(shapes, image.width, image.height, 384, 24)
        view = np.asarray(ImageOps.pad(image, (384, 384), color=(127, 127, 127))).astype(int)
        centres = ((np.arange(16) + 0.5) * 24).astype(int)
        pixels = view[centres][:, centres].reshape(-1, 3)  # [P, 3]
        for name, rgb in COLORS.items():
            shown = np.abs(pixels - np.asarray(rgb)).max(axis=1) < 3
            assert on_shape[shown].all(), (seed, name)
            allowed = [np.asarray(box_from_pixels(s.box_px, image.width, image.height)) / 999
                       for s in shapes if s.color == name]
            for box in boxes[shown]:
                assert any(np.allclose(box, a, atol=1e-6) for a in allowed), (seed, name, box * 999)
            checked += int(shown.sum())
    assert checked > 500


def test_scene_images_are_the_processors_global_view_in_any_order():
    processor = DeepseekVLV2Processor.from_pretrained(DEFAULT_CHECKPOINT)
    images = SceneImages(10, seed=4, transform=processor.image_transform, image_size=384, patch_size=24)
    later, again = images[7], images[7]
    for a, b in zip(later, again):
        np.testing.assert_array_equal(a, b)
    pixels, labels, boxes, on_shape = images[3]
    image, shapes = draw_scene(random.Random("4-3"))
    processed = processor.process_one(prompt="<image>\nx", images=[image], inference_mode=True)
    np.testing.assert_array_equal(pixels, processed.images[0])
    np.testing.assert_array_equal(labels, presence_labels(shapes))
    expected_boxes, expected_on = patch_boxes(shapes, image.width, image.height, 384, 24)
    np.testing.assert_array_equal(boxes, expected_boxes)
    np.testing.assert_array_equal(on_shape, expected_on)


def test_presence_head_loss_against_numpy_and_it_trains_the_models_tower():
    model = DeepseekVLV2ForCausalLM.from_pretrained(DEFAULT_CHECKPOINT, progress=False)
    head = PresenceHead(model.vision)
    assert head.vision is model.vision
    processor = DeepseekVLV2Processor.from_pretrained(DEFAULT_CHECKPOINT)
    images = SceneImages(2, seed=0, transform=processor.image_transform, image_size=384, patch_size=24)
    batch = collate([images[0], images[1]])
    logits, boxes = (out.numpy() for out in head(batch["pixels"]))  # [2, L], [2, P, 4]
    features = model.vision(batch["pixels"]).numpy()  # [2, P, C]
    np.testing.assert_allclose(
        logits, (features @ head.score.weight.numpy() + head.score.bias.numpy()).max(axis=1), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(boxes, features @ head.locate.weight.numpy() + head.locate.bias.numpy(),
                               rtol=1e-5, atol=1e-5)
    labels = batch["labels"].numpy()
    bce = np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))))
    on_shape = batch["on_shape"].numpy().astype(bool)
    box_error = np.abs(boxes - batch["boxes"].numpy())[on_shape].mean()
    loss = presence_loss(head, batch)
    np.testing.assert_allclose(float(loss), bce + BOX_LOSS_WEIGHT * box_error, rtol=1e-5)
    loss.backward()
    assert float(model.vision.patch_embed.proj.weight.grad.abs().sum()) > 0
