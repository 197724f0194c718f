"""The bundled demo: a small checkpoint in the official layout, demo images with a question each, and the
synthetic shapes data set it is trained on (``paddlemix_vl2.demo.shapes``).

The bundled checkpoint is NOT DeepSeek's weights: it is a small model with the DeepSeek-VL2 architecture
trained from random initialisation on synthetic shapes (``python -m paddlemix_vl2.demo.train_demo``, see
README.md in this folder). It lets every example run out of the box; pass ``--model_path`` to use a real
DeepSeek-VL2 checkpoint.
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_CHECKPOINT = os.path.join(_HERE, "checkpoint")
# The demo images are scenes of ``shapes.draw_scene(random.Random(seed))`` for these seeds, which neither
# training (seed 1) nor the evaluations use: one, two and three shapes.
DEMO_SCENE_SEEDS = (106, 100, 101)
DEMO_IMAGES = tuple(os.path.join(_HERE, "images", f"shapes_{i}.png") for i in (1, 2, 3))
# A question each image answers (one image per conversation, as the demo model was trained).
DEMO_QUESTIONS = ("What shape is in the image?", "What color is the circle?", "How many shapes are there?")

__all__ = ["DEFAULT_CHECKPOINT", "DEMO_SCENE_SEEDS", "DEMO_IMAGES", "DEMO_QUESTIONS"]
