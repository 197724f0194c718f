"""Stage 1 of the demo recipe: presence labels, patch targets, the on-the-fly scenes and the heads."""
import random

import numpy as np
import paddle

from paddlemix_vl2.demo import DEFAULT_CHECKPOINT
from paddlemix_vl2.demo.shapes import Shape, draw_scene
from paddlemix_vl2.demo.vision_pretraining import (
    DENSE_OUTPUTS,
    PRESENCE_LABELS,
    PretrainingHeads,
    SceneImages,
    collate,
    patch_targets,
    presence_labels,
    pretraining_loss,
)
from paddlemix_vl2.models.deepseek_vl2 import DeepseekVLV2ForCausalLM
from paddlemix_vl2.processors import DeepseekVLV2Processor


def test_presence_labels_name_every_pair_shape_and_colour_of_the_scene():
    shapes = [Shape("circle", "red", (0, 0, 10, 10)), Shape("square", "blue", (20, 20, 30, 30)),
              Shape("circle", "blue", (40, 40, 50, 50))]
    on = {label for label, value in zip(PRESENCE_LABELS, presence_labels(shapes)) if value == 1}
    assert on == {"red circle", "blue square", "blue circle", "circle", "square", "red", "blue"}
    assert len(PRESENCE_LABELS) == 12 + 3 + 4 and len(set(PRESENCE_LABELS)) == len(PRESENCE_LABELS)


def test_patch_targets_give_each_patch_the_box_of_the_shape_under_its_centre():
    # 480 x 240 image in a 384 view: scale 0.8, 96 px of letterbox above and below; 24-px patches.
    square = Shape("square", "red", (0, 0, 120, 120))  # view x 0..96, y 96..192: patch columns 0-3, rows 4-7
    circle = Shape("circle", "blue", (300, 120, 420, 240))  # view x 240..336, y 192..288: columns 10-13, rows 8-11
    targets = patch_targets((480, 240), [square, circle], view=384, grid=16).reshape(16, 16, 5)
    inside = targets[..., 0] != -1
    expected = np.zeros((16, 16), dtype=bool)
    expected[4:8, 0:4] = expected[8:12, 10:14] = True
    np.testing.assert_array_equal(inside, expected)
    np.testing.assert_array_equal(targets[5, 2, :4], [0, 0, 250, 500])  # round(120 / 480 * 999), round(499.5) (half to even)
    np.testing.assert_array_equal(targets[9, 11, :4], [624, 500, 874, 999])
    assert (targets[~inside, :4] == -1).all() and (targets[..., 4] == 1).all()  # two shapes: class 1


def test_patch_targets_give_a_patch_in_two_boxes_the_nearer_box():
    left = Shape("circle", "red", (0, 0, 200, 200))
    right = Shape("square", "blue", (150, 150, 384, 384))
    targets = patch_targets((384, 384), [left, right], view=384, grid=16).reshape(16, 16, 5)
    np.testing.assert_array_equal(targets[7, 7, :4], [0, 0, 520, 520])  # centre 180: nearer (100, 100)
    np.testing.assert_array_equal(targets[8, 8, :4], [390, 390, 999, 999])  # centre 204: nearer (267, 267)


def test_scene_images_are_the_processors_global_view_in_any_order():
    processor = DeepseekVLV2Processor.from_pretrained(DEFAULT_CHECKPOINT)
    grid = processor.image_size // processor.config.patch_size
    images = SceneImages(10, seed=4, transform=processor.image_transform, image_size=processor.image_size, grid=grid)
    later = images[7][0]
    pixels, labels, targets = images[3]
    again = images[7][0]
    np.testing.assert_array_equal(later, again)
    image, shapes = draw_scene(random.Random("4-3"))
    processed = processor.process_one(prompt="<image>\nx", images=[image], inference_mode=True)
    np.testing.assert_array_equal(pixels, processed.images[0])
    np.testing.assert_array_equal(labels, presence_labels(shapes))
    np.testing.assert_array_equal(targets, patch_targets(image.size, shapes, processor.image_size, grid))


def _numpy_cross_entropy(logits, labels):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def test_heads_score_by_the_best_patch_and_the_loss_matches_numpy_and_trains_the_models_tower():
    model = DeepseekVLV2ForCausalLM.from_pretrained(DEFAULT_CHECKPOINT, progress=False)
    head = PretrainingHeads(model.vision, seed=0)
    assert head.vision is model.vision
    processor = DeepseekVLV2Processor.from_pretrained(DEFAULT_CHECKPOINT)
    images = SceneImages(2, seed=0, transform=processor.image_transform, image_size=processor.image_size,
                         grid=processor.image_size // processor.config.patch_size)
    batch = collate([images[0], images[1]])
    presence, dense = head(batch["pixels"])
    presence, dense = presence.numpy(), dense.numpy()  # [2, L], [2, P, DENSE_OUTPUTS]
    features = model.vision(batch["pixels"]).numpy()  # [2, P, C]
    weight, bias = head.score.weight.numpy(), head.score.bias.numpy()  # [C, L], [L]
    np.testing.assert_allclose(presence, (features @ weight + bias).max(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense, features @ head.dense.weight.numpy() + head.dense.bias.numpy(), rtol=1e-5, atol=1e-5)

    labels = batch["labels"].numpy()
    bce = np.mean(np.maximum(presence, 0) - presence * labels + np.log1p(np.exp(-np.abs(presence))))
    dense = dense.reshape(-1, DENSE_OUTPUTS)
    targets = batch["patch_targets"].numpy().reshape(-1, 5)
    inside = targets[:, 0] != -1
    assert 0 < inside.sum() < len(inside)
    box = targets[inside, :4]
    digits = _numpy_cross_entropy(dense[inside, :40].reshape(-1, 4, 10), box // 100).mean(axis=1).mean()
    box_l1 = np.abs(1 / (1 + np.exp(-dense[inside, 40:44])) - box / 999).mean()
    count = _numpy_cross_entropy(dense[:, 44:], targets[:, 4]).mean()
    loss = pretraining_loss(head, batch, digit_weight=0.3, box_weight=2.0, count_weight=0.1)
    np.testing.assert_allclose(float(loss), bce + 0.3 * digits + 2.0 * box_l1 + 0.1 * count, rtol=1e-5)
    loss.backward()
    assert float(model.vision.patch_embed.proj.weight.grad.abs().sum()) > 0


def test_heads_start_from_their_seed_whatever_paddles_generator_holds():
    model = DeepseekVLV2ForCausalLM.from_pretrained(DEFAULT_CHECKPOINT, progress=False)
    paddle.seed(1)
    first = PretrainingHeads(model.vision, seed=4)
    paddle.seed(2)
    second = PretrainingHeads(model.vision, seed=4)
    other = PretrainingHeads(model.vision, seed=5).score.weight.numpy()
    for a, b in ((first.score, second.score), (first.dense, second.dense)):
        np.testing.assert_array_equal(a.weight.numpy(), b.weight.numpy())
    score = first.score.weight.numpy()
    assert not np.array_equal(score, other)
    limit = np.sqrt(6.0 / (score.shape[0] + score.shape[1]))
    assert np.abs(score).max() <= limit and score.std() > limit / 3
