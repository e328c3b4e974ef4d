"""dali-scp: GPU input pipelines (NVIDIA DALI + CuPy) for Mask R-CNN with Simple Copy-Paste.

Install with the extra that matches your CUDA (never two nvidia-dali-* wheels side by side):
    pip install -e ".[cuda12]"   # nvidia-dali-cuda120 + cupy-cuda12x
    pip install -e ".[cuda13]"   # nvidia-dali-cuda130 + cupy-cuda13x
    pip install -e ".[cpu]"      # no GPU: DALI's CPU pipelines only
"""
from setuptools import find_packages, setup

setup(
    name="dali-scp",
    version="0.1.0",
    description="Simple Copy-Paste and scale jittering for Mask R-CNN on the GPU with NVIDIA DALI",
    python_requires=">=3.10",
    packages=find_packages(include=["dali_scp", "pipelines", "trainer"]),
    package_data={"dali_scp": ["emulated_device.h"]},  # CUDA's vocabulary for the kernels run on the CPU
    install_requires=[
        "numpy>=1.23",
        "torch>=2.1",
        "torchvision>=0.16",
        "pycocotools>=2.0.6",
        "faster-coco-eval>=1.8",  # LVIS's federated evaluation (trainer/lvis_eval.py; tested with 1.8.0)
        "pillow>=9",
        "scipy>=1.9",
        "tqdm>=4.60",
        "tensorboard>=2.10",
    ],
    extras_require={
        "cpu": ["nvidia-dali-cuda120>=2.0"],
        "cuda12": ["nvidia-dali-cuda120>=2.0", "cupy-cuda12x>=14.1"],
        "cuda13": ["nvidia-dali-cuda130>=2.0", "cupy-cuda13x>=14.1"],
        # nvidia-cuda-nvrtc (a 90 MB wheel, already a dependency of PyPI's CUDA build of torch): NVRTC, so CI
        # compiles every raw CUDA kernel without a GPU (tests/test_kernels.py)
        "test": ["pytest>=7", "hypothesis>=6", "nvidia-cuda-nvrtc>=13"],
    },
)
