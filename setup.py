"""Build lpreg: pure-Python package + Triton kernels + the compiled `lpreg._C` extension.

The Triton kernels live in the top-level `kernels/` folder and are the package `lpreg.kernels`
(never a top-level `kernels` module: PyPI already has one, and transformers imports it). The mapping
is a symbolic link committed to git, `lpreg/kernels -> ../kernels`, which every tool follows as it
is: an editable install and a checkout on sys.path import through it, mypy and an IDE resolve
`lpreg.kernels.token_stats` to `kernels/token_stats.py`, and the sdist and the wheel store the files
themselves under `lpreg/kernels/`. `kernels/` has no `__init__.py`, so it never shadows that
distribution when the checkout is on sys.path, and `lpreg.kernels` is a namespace package, which
`find_packages` does not list: it is named below.

The C++ extension is built against the torch that is already installed, so install with
`pip install --no-build-isolation .`. It is an accelerator, not a requirement: when its build fails
(no compiler, a compiler error), the install goes on without it after one warning that says why
and how to retry, and records the reason in `lpreg/_C_build_failed.txt`, which `lpreg.backends()`
reports. The C++ standard follows the installed torch's headers (C++20 from torch 2.14, else C++17),
for the host compiler and nvcc alike. Environment knobs:

  LPREG_REQUIRE_EXT=1      a failed extension build fails the install (CI, packagers)
  LPREG_SKIP_EXT=1         build no extension at all (pure Python + Triton)
  LPREG_SKIP_CUDA=1        build the CPU extension only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0": A100 and H100/H200)
  MAX_JOBS                 parallel compile jobs (ninja is used when it is installed)
  LPREG_CPU_ISA            vector ISA of the CPU kernels: "auto" (default: AVX2 on an x86-64
                           build machine that has it), "avx2", or "default" (portable SSE2
                           build, for binaries that must run on pre-2013 x86 CPUs)
"""

import glob
import os
import platform
import sys

import setuptools
from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_FAILURE_FILE = "_C_build_failed.txt"  # beside the extension; lpreg._native reads it

# pyproject.toml's PEP 639 licence string needs setuptools 77; --no-build-isolation skips the check
# of [build-system] requires, so an older one would fail later with an obscure metadata error
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"lpreg needs setuptools >= 77 to build (found {setuptools.__version__}): "
             "pip install -U 'setuptools>=77', then install lpreg again")


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    """Return (ext_modules, cmdclass); the CPU extension always, CUDA when torch and CUDA_HOME allow."""
    if _truthy("LPREG_SKIP_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - torch is a hard requirement
        raise RuntimeError(
            "lpreg builds its C++ extension against the installed torch: install torch first, "
            "then `pip install --no-build-isolation .` (or set LPREG_SKIP_EXT=1)"
        ) from exc

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    binding = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not binding:
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = (
        bool(cuda_sources)
        and not _truthy("LPREG_SKIP_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )
    std = f"-std={_cxx_standard(torch)}"
    cxx_flags = ["-O3", std, "-fopenmp"] + _cpu_isa_flags(torch)
    common = dict(
        name="lpreg._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            sources=binding + cpu_sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags + ["-DLPREG_WITH_CUDA"],
                "nvcc": ["-O3", std, "--use_fast_math", "-lineinfo", "-DLPREG_WITH_CUDA"],
            },
            **common,
        )
    else:
        ext = cpp_extension.CppExtension(
            sources=binding + cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            **common,
        )
    build_ext = _optional(cpp_extension.BuildExtension).with_options(use_ninja=_has_ninja())
    return [ext], {"build_ext": build_ext}


def _cxx_standard(torch):
    """The C++ standard the installed torch's headers need: ATen.h stops C++ below 20 from torch 2.14."""
    header = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(header) as f:
            needs_20 = "202002L" in f.read()
    except OSError:  # no headers where expected: go by the version
        needs_20 = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
    return "c++20" if needs_20 else "c++17"


def _optional(build_ext_class):
    """build_ext that lets the install go on without the extension when its build fails."""

    class OptionalBuildExt(build_ext_class):
        def run(self):
            marker = os.path.join(os.path.dirname(self.get_ext_fullpath("lpreg._C")), BUILD_FAILURE_FILE)
            try:
                super().run()
            except (Exception, SystemExit) as exc:  # no compiler, a compile or link error
                if _truthy("LPREG_REQUIRE_EXT"):
                    raise
                reason = " ".join(str(exc).split())[-600:] or type(exc).__name__
                os.makedirs(os.path.dirname(marker), exist_ok=True)
                with open(marker, "w") as f:
                    f.write(f"its build failed ({type(exc).__name__}: {reason}). To retry and see the compiler's "
                            "error: LPREG_REQUIRE_EXT=1 pip install -v --no-build-isolation -e . (or the same "
                            "without -e).\n")
                print(
                    "WARNING: lpreg: the compiled extension lpreg._C could not be built "
                    f"({type(exc).__name__}: {reason}). lpreg is installed without it: the PyTorch and Triton "
                    "backends work, backend='cpu'/'cuda' do not, and lpreg.backends() says so. To retry and see "
                    "the compiler's error: LPREG_REQUIRE_EXT=1 pip install -v --no-build-isolation -e .",
                    file=sys.stderr,
                )
            else:
                if os.path.exists(marker):
                    os.remove(marker)

    return OptionalBuildExt


def _cpu_isa_flags(torch):
    """Flags that select at::vec::Vectorized's AVX2 implementation (Sleef exp, 8 lanes).

    ATen's own kernels are compiled once per ISA and dispatched at run time; an extension is
    one translation unit set, so it is compiled for one ISA: AVX2 where the build machine has
    it (every x86-64 server CPU since 2013), the portable default otherwise or on request.
    """
    isa = os.environ.get("LPREG_CPU_ISA", "auto").strip().lower()
    if isa not in ("auto", "avx2", "default"):
        raise RuntimeError(f"LPREG_CPU_ISA must be 'auto', 'avx2' or 'default', got {isa!r}")
    if isa == "auto":
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        isa = "avx2" if (x86 and has_avx2) else "default"
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def _has_ninja():
    try:
        from torch.utils.cpp_extension import is_ninja_available

        return is_ninja_available()
    except Exception:
        return False


ext_modules, cmdclass = _extensions()

setup(
    # lpreg.kernels has no __init__.py (see above): find_packages cannot see it, so it is named here
    packages=find_packages(include=["lpreg", "lpreg.*"]) + ["lpreg.kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
