from setuptools import find_packages, setup

# The inference core needs PaddlePaddle and these four. Pins:
# - PaddlePaddle is not listed: it comes as paddlepaddle (CPU, PyPI) or paddlepaddle-gpu (Paddle's index),
#   two distributions of one `paddle` module, and listing either would make pip install the CPU wheel over
#   a GPU one. build_paddle_env.sh installs the right one (3.3.1); paddlemix_vl2/paddle_version.py refuses
#   a missing one, or one older than 3.2, with a one-line message saying what to install.
# - pillow 13: Pillow 9.5-12.3 bicubic-downscale differently, which breaks pixel parity with the
#   official processor (the goldens were made with Pillow 13.0.0).
# - safetensors >=0.6: framework="paddle" in safe_open with bf16 support.
INSTALL_REQUIRES = [
    "safetensors>=0.6,<1",
    "tokenizers>=0.19,<1",
    "pillow>=13,<14",
    "numpy>=1.24",
]

setup(
    name="paddlemix_vl2",
    version="0.1.0",
    description="DeepSeek-VL2 in PaddlePaddle: loads the official checkpoints as they are",
    packages=find_packages(include=["paddlemix_vl2", "paddlemix_vl2.*"]),
    # The few-row linear kernel's C source is compiled on the user's machine at first use (native.py).
    package_data={"paddlemix_vl2": ["demo/**/*", "models/deepseek_vl2/*.c", "models/deepseek_vl2/*.h"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8"],
    },
    entry_points={
        "console_scripts": [
            "paddlemix-vl2=paddlemix_vl2.__main__:main",
            "paddlemix-vl2-infer=paddlemix_vl2.apps.multi_image_infer:cli",
            "paddlemix-vl2-single-infer=paddlemix_vl2.apps.single_image_infer:cli",
            "paddlemix-vl2-ground=paddlemix_vl2.apps.grounding_infer:cli",
            "paddlemix-vl2-chat=paddlemix_vl2.apps.chat:cli",
            "paddlemix-vl2-finetune=paddlemix_vl2.cli:finetune_main",
            "paddlemix-vl2-lora-merge=paddlemix_vl2.cli:lora_merge_main",
        ]
    },
)
