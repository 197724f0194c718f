"""The bundled demo: a small checkpoint in the official layout, demo images, and the synthetic shapes
data set it is trained on (``paddlemix_vl2.demo.shapes``).

The bundled checkpoint is NOT DeepSeek's weights: real weights cannot be shipped here. It lets every
example run out of the box; pass ``--model_path`` to use a real DeepSeek-VL2 checkpoint.
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_CHECKPOINT = os.path.join(_HERE, "checkpoint")
DEMO_IMAGES = tuple(os.path.join(_HERE, "images", f"shapes_{i}.png") for i in (1, 2, 3))

__all__ = ["DEFAULT_CHECKPOINT", "DEMO_IMAGES"]
