"""torchopt_ext: fused optimizers whose math lives once in C++ and is shared by
LibTorch (``torchopt_ext::optim``) and Python (``torchopt_ext.optim``)."""

import os

import torch  # noqa: F401  (load libtorch before the native library)

from . import (
    _C,  # noqa: F401  (loads libtorchopt_ext: registers torch.ops.torchopt_ext.*)
    _ops,  # noqa: F401  (fake implementations for torch.compile)
    clip,
    hessian,
    optim,
    schedules,
)

__version__ = "0.1.0"

#: Folder to add to ``CMAKE_PREFIX_PATH`` so that a LibTorch program's
#: ``find_package(TorchOptExt)`` finds this installation (compare
#: ``torch.utils.cmake_prefix_path``).
cmake_prefix_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "share", "cmake")

__all__ = ["optim", "schedules", "hessian", "clip", "cmake_prefix_path", "__version__"]
