"""csrc/cuda/*.cu compile with plain nvcc (no torch headers), for sm_80 and sm_90, without a GPU.

The CUDA kernels of lpreg._C are torch-free on purpose (house style: the binding file alone
touches at::Tensor), so that this check runs on a CPU-only CI machine. It is compile-only:
the GPU-marked tests in test_token_stats_native.py run the kernels where a device exists.
"""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)
ARCHS = ("80", "90")

pytestmark = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc is not installed")


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/ holds no .cu file"


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_nvcc_compiles(source, tmp_path):
    obj = tmp_path / (os.path.basename(source) + ".o")
    cmd = [NVCC, "-c", source, "-o", str(obj), "-std=c++17", "-O3", "-I", os.path.join(ROOT, "csrc"),
           "--threads", "0", "-Werror", "all-warnings"]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}"
    assert obj.stat().st_size > 0
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(NVCC), "cuobjdump")
    if os.path.exists(cuobjdump):  # one cubin per requested architecture
        listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True).stdout
        for arch in ARCHS:
            assert f"sm_{arch}" in listing, f"no sm_{arch} code in {obj}:\n{listing}"
