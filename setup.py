"""Packaging. The native kernels are compiled just in time, on first use, by
shira_kernels/_native.py (torch.utils.cpp_extension + ninja, cached per source hash), so that
installing never needs a compiler or a matching torch in pip's isolated build environment. The
C++/CUDA sources in csrc/ ship inside the package as shira_kernels/csrc."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["shira_kernels", "shira_kernels.*"]) + ["shira_kernels.csrc"],
    package_dir={"shira_kernels.csrc": "csrc"},
    package_data={"shira_kernels.csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu",
                                         "cuda/*.cuh", "cuda/*.cpp", "cuda/*.h"]},
)
