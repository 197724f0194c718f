"""DeepSeek-VL2 in PaddlePaddle."""
from ._env import configure_cpu_threads, flush_denormals, keep_freed_memory

configure_cpu_threads()
flush_denormals()
keep_freed_memory()

__version__ = "0.1.0"
