"""Install jit_fast (JiT training/sampling) and jit_kernels (fused Triton ops for the JiT block)."""

from setuptools import find_packages, setup

# transformers 5 loads with `dtype=`; 5.25 requires Hugging Face's `kernels` (why our kernel package is jit_kernels)
TEXT = ["transformers>=5.24,<6", "tokenizers>=0.23,<1"]
FP8 = ["torchao>=0.18,<0.19"]  # torchao.float8 training (--fp8); its float8 API moves between 0.x minors

setup(
    name="jit_fast",
    version="0.1.0",
    description="Fast training and sampling of JiT (pixel-space flow matching with x-prediction) on NVIDIA GPUs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["jit_fast", "jit_fast.*", "jit_kernels", "jit_kernels.*"]),
    # Ranges: the lower bound is the release the full suite passed with (constraints.txt pins the exact set CI
    # last passed with); the upper bound is the next release whose APIs we rely on could change (FSDP2, DCP and
    # torch.library move between torch minors; Triton's compiler API and 0.x packages between minors).
    install_requires=[
        "torch>=2.14,<2.15",
        "torchvision>=0.29,<0.30",
        "numpy>=2",
        "pillow",
        "triton>=3.8,<3.9; platform_system == 'Linux'",
        "nvidia-dali-cuda130>=2.4,<3",
        "torch-fidelity>=0.4,<0.5",
        "tqdm",
        "tensorboard",
        "safetensors>=0.8,<1",
        "scikit-learn",
    ],
    extras_require={
        "test": ["pytest>=9,<10", "pytest-benchmark>=5,<6", "scikit-learn", "scikit-image", "ruff>=0.17,<0.18",
                 *TEXT, *FP8],
        "flash": ["flash-attn"],
        "text": TEXT,
        "fp8": FP8,
    },
)
