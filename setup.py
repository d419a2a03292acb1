"""Install jit_fast (JiT training/sampling) and jit_kernels (fused Triton ops for the JiT block)."""

from setuptools import find_packages, setup

setup(
    name="jit_fast",
    version="0.1.0",
    description="Fast training and sampling of JiT (pixel-space flow matching with x-prediction) on NVIDIA GPUs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["jit_fast", "jit_fast.*", "jit_kernels", "jit_kernels.*"]),
    # torch/torchvision ranges admit the 2.14.1 / 0.29.1 builds that pip takes from local disk;
    # install those two first (see README) so that pip never fetches another multi-GB torch.
    install_requires=[
        "torch>=2.6,<2.15",
        "torchvision>=0.21,<0.30",
        "numpy",
        "pillow",
        "triton; platform_system == 'Linux'",
        "nvidia-dali-cuda130",
        "torch-fidelity",
        "tqdm",
        "tensorboard",
        "safetensors",
        "scikit-learn",
    ],
    extras_require={
        # transformers 5 (the `dtype=` loading argument); tested with 5.24 and tokenizers 0.23
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "scikit-image", "ruff", "transformers>=5", "tokenizers"],
        "flash": ["flash-attn"],
        "text": ["transformers>=5", "tokenizers"],
    },
)
