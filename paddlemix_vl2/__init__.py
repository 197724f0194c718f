"""DeepSeek-VL2 in PaddlePaddle."""
from ._env import configure_cpu_threads

configure_cpu_threads()

__version__ = "0.1.0"
