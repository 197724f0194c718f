"""DeepSeek-VL2 in PaddlePaddle."""
from ._env import configure_cpu_threads, flush_denormals

configure_cpu_threads()
flush_denormals()

__version__ = "0.1.0"
