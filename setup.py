"""Build torchopt_ext: CMake builds libtorchopt_ext and the _C loader module
against the installed torch and installs them, with the headers and the
find_package(TorchOptExt) config, into the package directory.

    pip install --no-build-isolation .        # or -e . for development

Environment knobs:
    TORCHOPT_EXT_BUILD_DIR       CMake build tree (default: build/)
    TORCHOPT_EXT_BUILD_TESTS=1   also build the GoogleTest suite (ctest in the build tree)
    TORCHOPT_EXT_BUILD_EXAMPLES=1  also build examples/cpp in the build tree
    TORCHOPT_EXT_WITH_CUDA=0|1   override the default (CUDA iff torch has CUDA and nvcc is found)
    TORCHOPT_EXT_CUDA_ARCHS      CUDA architectures, ';'-separated (default "80;90")
    MAX_JOBS                     parallel compile jobs
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "on", "true", "yes")


def _want_cuda() -> bool:
    import torch

    has_cuda_torch = torch.version.cuda is not None
    from torch.utils.cpp_extension import CUDA_HOME

    return _flag("TORCHOPT_EXT_WITH_CUDA", has_cuda_torch and CUDA_HOME is not None)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch.utils

        package_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        if getattr(self, "editable_mode", False):
            # Editable installs import the package from the source tree, and
            # setuptools copies back only _C: install everything there.
            package_dir = ROOT / "torchopt_ext"
        build_dir = Path(os.environ.get("TORCHOPT_EXT_BUILD_DIR", ROOT / "build")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        on_off = {True: "ON", False: "OFF"}
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DTORCHOPT_EXT_BUILD_PYTHON=ON",
            f"-DTORCHOPT_EXT_BUILD_TESTS={on_off[_flag('TORCHOPT_EXT_BUILD_TESTS', False)]}",
            f"-DTORCHOPT_EXT_BUILD_EXAMPLES={on_off[_flag('TORCHOPT_EXT_BUILD_EXAMPLES', False)]}",
            f"-DTORCHOPT_EXT_WITH_CUDA={on_off[_want_cuda()]}",
        ]
        if os.environ.get("TORCHOPT_EXT_CUDA_ARCHS"):
            configure.append(f"-DTORCHOPT_EXT_CUDA_ARCHS={os.environ['TORCHOPT_EXT_CUDA_ARCHS']}")
        if shutil.which("ninja") and not (build_dir / "Makefile").exists():
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", jobs])
        subprocess.check_call(["cmake", "--install", str(build_dir), "--prefix", str(package_dir)])
        built_module = Path(self.get_ext_fullpath(ext.name)).resolve()
        if not built_module.exists():
            # setuptools copies the module from where it expects it.
            built_module.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package_dir / built_module.name, built_module)


setup(
    name="torchopt_ext",
    version="0.1.0",
    description="Fused optimizers for PyTorch and LibTorch: one C++ implementation, two front ends",
    packages=find_packages(include=["torchopt_ext", "torchopt_ext.*"]),
    ext_modules=[Extension("torchopt_ext._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],
    extras_require={"test": ["pytest", "numpy"]},
    zip_safe=False,
)
