"""Build lpreg: pure-Python package + Triton kernels + the compiled `lpreg._C` extension.

The Triton kernels live in the top-level `kernels/` folder and are installed as
`lpreg.kernels` (never as a top-level `kernels` module: PyPI already has one).

The C++ extension is built against the torch that is already installed, so install with
`pip install --no-build-isolation .`. Environment knobs:

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

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


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
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"] + _cpu_isa_flags(torch)
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
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DLPREG_WITH_CUDA"],
            },
            **common,
        )
    else:
        ext = cpp_extension.CppExtension(
            sources=binding + cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            **common,
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=_has_ninja())
    return [ext], {"build_ext": build_ext}


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
    packages=find_packages(include=["lpreg", "lpreg.*"]) + ["lpreg.kernels"],
    package_dir={"lpreg.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
