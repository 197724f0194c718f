"""Stage 1 of the demo recipe: presence labels, the on-the-fly scenes and the max-over-patches head."""
import random

import numpy as np
import paddle

from paddlemix_vl2.demo import DEFAULT_CHECKPOINT
from paddlemix_vl2.demo.shapes import Shape, draw_scene
from paddlemix_vl2.demo.vision_pretraining import (
    PRESENCE_LABELS,
    PresenceHead,
    SceneImages,
    collate,
    presence_labels,
    presence_loss,
)
from paddlemix_vl2.models.deepseek_vl2 import DeepseekVLV2ForCausalLM
from paddlemix_vl2.processors import DeepseekVLV2Processor


def test_presence_labels_name_every_pair_shape_and_colour_of_the_scene():
    shapes = [Shape("circle", "red", (0, 0, 10, 10)), Shape("square", "blue", (20, 20, 30, 30)),
              Shape("circle", "blue", (40, 40, 50, 50))]
    on = {label for label, value in zip(PRESENCE_LABELS, presence_labels(shapes)) if value == 1}
    assert on == {"red circle", "blue square", "blue circle", "circle", "square", "red", "blue"}
    assert len(PRESENCE_LABELS) == 12 + 3 + 4 and len(set(PRESENCE_LABELS)) == len(PRESENCE_LABELS)


def test_scene_images_are_the_processors_global_view_in_any_order():
    processor = DeepseekVLV2Processor.from_pretrained(DEFAULT_CHECKPOINT)
    images = SceneImages(10, seed=4, transform=processor.image_transform, image_size=processor.image_size)
    later, _ = images[7]
    pixels, labels = images[3]
    again, _ = images[7]
    np.testing.assert_array_equal(later, again)
    image, shapes = draw_scene(random.Random("4-3"))
    processed = processor.process_one(prompt="<image>\nx", images=[image], inference_mode=True)
    np.testing.assert_array_equal(pixels, processed.images[0])
    np.testing.assert_array_equal(labels, presence_labels(shapes))


def test_presence_head_scores_an_image_by_its_best_patch_and_trains_the_models_tower():
    model = DeepseekVLV2ForCausalLM.from_pretrained(DEFAULT_CHECKPOINT, progress=False)
    head = PresenceHead(model.vision, seed=0)
    assert head.vision is model.vision
    processor = DeepseekVLV2Processor.from_pretrained(DEFAULT_CHECKPOINT)
    images = SceneImages(2, seed=0, transform=processor.image_transform, image_size=processor.image_size)
    batch = collate([images[0], images[1]])
    logits = head(batch["pixels"]).numpy()  # [2, L]
    features = model.vision(batch["pixels"]).numpy()  # [2, P, C]
    weight, bias = head.score.weight.numpy(), head.score.bias.numpy()  # [C, L], [L]
    np.testing.assert_allclose(logits, (features @ weight + bias).max(axis=1), rtol=1e-5, atol=1e-5)
    labels = batch["labels"].numpy()
    expected = np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))))
    loss = presence_loss(head, batch)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    loss.backward()
    assert float(model.vision.patch_embed.proj.weight.grad.abs().sum()) > 0


def test_presence_head_starts_from_its_seed_whatever_paddles_generator_holds():
    model = DeepseekVLV2ForCausalLM.from_pretrained(DEFAULT_CHECKPOINT, progress=False)
    paddle.seed(1)
    first = PresenceHead(model.vision, seed=4).score.weight.numpy()
    paddle.seed(2)
    second = PresenceHead(model.vision, seed=4).score.weight.numpy()
    other = PresenceHead(model.vision, seed=5).score.weight.numpy()
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    limit = np.sqrt(6.0 / (first.shape[0] + first.shape[1]))
    assert np.abs(first).max() <= limit and first.std() > limit / 3
