"""The two halves of the forward on a vocabulary shard (docs/spec.md §6), backend by backend, without a
process group: every backend's partials equal the PyTorch backend's, the C++ constants name the
layout of lpreg/_contract.py, the CUDA passes (run on the CPU through tests/test_cuda_compile.py's
host emulation) equal the C++ ones, and the Triton passes compile for sm_90 with 16-byte loads.
The combination across ranks, and everything end to end, is tests/test_vocab_parallel.py."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from lpreg import _backends, _contract, _rows
from lpreg import _token_stats_torch_backend as torch_backend
from tests.spec_oracle import make_logits
from tests.test_cuda_compile import EMULATION_H, ROOT, _cuda_include, needs_emulation

BACKENDS = ["triton", "cpu"]


def _shard_rows(dtype):
    """Rows of a shard: peaked / flat / random with -inf entries, an all -inf shard, a NaN, a +inf,
    and an ignored row."""
    x = make_logits(6, 45, seed=1)
    x[3] = -math.inf
    x[4, 7] = math.nan
    x[5, 9] = math.inf
    x = torch.cat([x, make_logits(1, 45, seed=2)])
    return x.to(dtype), torch.tensor([1, 2, 3, 4, 5, 6, -100])


def _pass2_inputs(part):
    """A cutoff, reference and argmax per row as the combination would give them (one shard's own)."""
    my = part[:, _contract.PART_MAX_Y]
    my_ref = torch.where(torch.isfinite(my), my, torch.zeros_like(my))
    cutoff = my + math.log(0.05)
    argmax = part[:, _contract.PART_ARGMAX_Y].long()
    return cutoff, my_ref, argmax


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_proxy", [False, True])
@pytest.mark.parametrize("fixed", [False, True])
def test_shard_passes_match_the_torch_backend(backend, dtype, with_proxy, fixed):
    impl = _backends.implementation(_backends.resolve(backend, torch.device("cpu")), "token_stats")
    x, labels = _shard_rows(dtype)
    proxy = (x.float() + 0.3).to(dtype) if with_proxy else None
    want = torch_backend.token_stats_shard_pass1(x, labels, proxy, 1 / 0.9, fixed, -100)
    got = impl.token_stats_shard_pass1(x, labels, proxy, 1 / 0.9, fixed, -100)
    assert got.shape == (7, _contract.PASS1_WIDTH) and got.dtype == torch.float32
    assert got[:, _contract.PART_BAD].tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert got[:, _contract.PART_BAD].tolist() == want[:, _contract.PART_BAD].tolist()
    fine = [0, 1, 2, 3, 6]  # what a bad row's other slots hold is its own business: it ends NaN
    torch.testing.assert_close(got[fine], want[fine], rtol=1e-5, atol=1e-6)
    assert got[3, :3].tolist() == [-math.inf, 0.0, 0.0]  # an all -inf shard adds nothing
    assert got[6].tolist() == list(_contract.NEUTRAL_PASS1)  # the ignored row
    if fixed:  # the first argmax, exactly (a local column)
        assert torch.equal(got[fine, _contract.PART_ARGMAX_Y], want[fine, _contract.PART_ARGMAX_Y])
    cutoff, my_ref, argmax = _pass2_inputs(want)
    want2 = torch_backend.token_stats_shard_pass2(x, labels, proxy, 1 / 0.9, cutoff, my_ref, argmax, -100)
    got2 = impl.token_stats_shard_pass2(x, labels, proxy, 1 / 0.9, cutoff, my_ref, argmax, -100)
    assert got2.shape == (7, _contract.PASS2_WIDTH)
    torch.testing.assert_close(got2[fine], want2[fine], rtol=1e-5, atol=1e-6)
    assert got2[6].tolist() == [0.0, 0.0]
    assert (got2[[0, 1, 2], _contract.PART_KEPT] >= 1.0 - 1e-6).all()  # the shard's max is kept: e^0 = 1


def test_torch_pass1_is_the_row_moments():
    """The PyTorch backend's pass 1 against the row math it names (lpreg._rows.softmax_moments)."""
    x, _ = _shard_rows(torch.float32)
    part = torch_backend.token_stats_shard_pass1(x, None, None, 1.0, True, -100)
    m, _, s, t = _rows.softmax_moments(x[:3])
    assert torch.equal(part[:3, _contract.PART_MAX], m) and torch.equal(part[:3, _contract.PART_SUM], s)
    assert torch.equal(part[:3, _contract.PART_MOMENT], t)
    assert torch.equal(part[:3, _contract.PART_ARGMAX_Y].long(), x[:3].argmax(-1))


def test_row_partials_layout_is_one_definition():
    with open(os.path.join(ROOT, "csrc", "row_partials.h")) as f:
        consts = {k: int(v) for k, v in re.findall(r"constexpr int (k\w+) = (\d+);", f.read())}
    want = {"kPartMax": _contract.PART_MAX, "kPartSum": _contract.PART_SUM, "kPartMoment": _contract.PART_MOMENT,
            "kPartMaxY": _contract.PART_MAX_Y, "kPartSumY": _contract.PART_SUM_Y,
            "kPartArgmaxY": _contract.PART_ARGMAX_Y, "kPartBad": _contract.PART_BAD,
            "kPass1Width": _contract.PASS1_WIDTH, "kPartKept": _contract.PART_KEPT,
            "kPartCross": _contract.PART_CROSS, "kPass2Width": _contract.PASS2_WIDTH}
    assert consts == want
    assert len(_contract.PASS1_SLOTS) == _contract.PASS1_WIDTH == len(_contract.NEUTRAL_PASS1)


# ---- the CUDA passes on the CPU (tests/test_cuda_compile.py's emulation) --------------------------

SHARD_SOURCE = os.path.join(ROOT, "csrc", "cuda", "token_stats_shard.cu")
ENTRY = r"""
using namespace lpreg;
extern "C" int emu_pass1(const ShardPass1Args* a) { return (int)cuda::token_stats_shard_pass1(*a, nullptr); }
extern "C" int emu_pass2(const ShardPass2Args* a) { return (int)cuda::token_stats_shard_pass2(*a, nullptr); }
"""


@pytest.fixture(scope="module")
def emulated_shard(tmp_path_factory):
    import ctypes

    with open(SHARD_SOURCE) as f:
        src = f.read()
    src, launches = re.subn(r"([\w:]+<[^;]*?>)\s*<<<(.*?)>>>\((.*?)\);", r"emu_launch(\2, \1, \3);", src, flags=re.S)
    assert launches == 2, f"expected 2 kernel launches in token_stats_shard.cu, found {launches}"
    out = tmp_path_factory.mktemp("emu_shard")
    (out / "emulation.h").write_text(EMULATION_H)
    (out / "shard.cpp").write_text('#include "emulation.h"\n' + src + ENTRY)
    lib = out / "libshard.so"
    cmd = ["g++", "-std=c++20", "-O1", "-fno-strict-aliasing", "-fPIC", "-shared", "-pthread", "-w", "-I",
           _cuda_include(), "-I", os.path.join(ROOT, "csrc"), "-I", str(out), str(out / "shard.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float

    class Rows(ctypes.Structure):  # csrc/token_stats_args.h: RowInputs
        _fields_ = [("logits", p), ("proxy", p), ("labels", p), ("logits_dtype", ctypes.c_int),
                    ("proxy_dtype", ctypes.c_int), ("N", i64), ("V", i64), ("logits_row_stride", i64),
                    ("proxy_row_stride", i64), ("inv_temperature", f32), ("ignore_index", i64), ("softcap", f32)]

    class Pass1(ctypes.Structure):  # ShardPass1Args
        _fields_ = [("rows", Rows), ("partials", p), ("fixed", ctypes.c_bool)]

    class Pass2(ctypes.Structure):  # ShardPass2Args
        _fields_ = [("rows", Rows), ("partials", p), ("cutoff", p), ("max_y", p), ("argmax", p)]

    dtypes = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    so = ctypes.CDLL(str(lib))

    def rows(x, labels, proxy, inv_t):
        y = proxy if proxy is not None else x
        return Rows(x.data_ptr(), None if proxy is None else proxy.data_ptr(), labels.data_ptr(), dtypes[x.dtype],
                    dtypes[y.dtype], x.shape[0], x.shape[1], x.stride(0), y.stride(0), inv_t, -100, 0.0)

    def pass1(x, labels, proxy, inv_t, fixed, ignore_index):
        part = torch.empty(x.shape[0], _contract.PASS1_WIDTH)
        assert so.emu_pass1(ctypes.byref(Pass1(rows(x, labels, proxy, inv_t), part.data_ptr(), fixed))) == 0
        return part

    def pass2(x, labels, proxy, inv_t, cutoff, my_ref, argmax, ignore_index):
        part = torch.empty(x.shape[0], _contract.PASS2_WIDTH)
        ins = [cutoff.float().contiguous(), my_ref.float().contiguous(), argmax.long().contiguous()]
        args = Pass2(rows(x, labels, proxy, inv_t), part.data_ptr(), *(t.data_ptr() for t in ins))
        assert so.emu_pass2(ctypes.byref(args)) == 0
        return part

    return pass1, pass2


@pytest.mark.slow  # a g++ build of the emulation, then 128 OS threads a row: seconds
@needs_emulation
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cuda_shard_passes_match_the_cpu_kernel(emulated_shard, dtype):
    from lpreg import _native

    if not _native.available("cpu"):
        pytest.skip("lpreg._C is not built")
    pass1, pass2 = emulated_shard
    x, labels = _shard_rows(dtype)
    wide = make_logits(2, 700, seed=3).to(dtype)  # several warps and 16-byte chunks a row
    for xs, lab in ((x, labels), (wide, torch.tensor([5, 699])), (x[:, 3:], labels)):  # x[:, 3:]: unaligned rows
        for proxy in (None, (xs.float() - 0.2).to(dtype)):
            for fixed in (False, True):
                got = pass1(xs, lab, proxy, 1.25, fixed, -100)
                want = _native.token_stats_shard_pass1(xs, lab, proxy, 1.25, fixed, -100)
                assert torch.equal(got[:, _contract.PART_BAD], want[:, _contract.PART_BAD])
                fine = want[:, _contract.PART_BAD] == 0
                torch.testing.assert_close(got[fine], want[fine], rtol=1e-5, atol=1e-6)
                cutoff, my_ref, argmax = _pass2_inputs(want)
                got2 = pass2(xs, lab, proxy, 1.25, cutoff, my_ref, argmax, -100)
                want2 = _native.token_stats_shard_pass2(xs, lab, proxy, 1.25, cutoff, my_ref, argmax, -100)
                torch.testing.assert_close(got2[fine], want2[fine], rtol=1e-5, atol=1e-6)


# ---- the Triton passes compile for a GPU ------------------------------------------------------

@pytest.mark.slow
def test_triton_shard_passes_compile_with_vector_loads(tmp_path):
    """As tests/test_triton_compile.py does for the whole-row kernels: sm_90, bf16, no spills, 16-byte loads."""
    from tests.test_triton_compile import SCRIPT

    head = SCRIPT[:SCRIPT.index("arch, dt = int(sys.argv[1]), sys.argv[2]")]
    body = head + textwrap.dedent(
        r"""
        arch, dt, f32 = 90, "bf16", "*fp32"
        common = dict(part_ptr=f32, logits_ptr="*" + dt, proxy_ptr="*" + dt, labels_ptr="*i64", V="i32",
                      logits_row_stride="i64", proxy_row_stride="i64", inv_temperature="fp32", softcap="fp32",
                      ignore_index="i32")
        report = {}
        for proxy in (False, True):  # proxy=True with the soft-cap of the logit transform (issue 30)
            c = compile_kernel(token_stats._shard_pass1_kernel, common,
                               dict(HAS_PROXY=proxy, HAS_LABELS=True, FIXED=True, SOFTCAP=proxy, BLOCK_V=4096,
                                    MAX_BLOCKS=64), arch)
            report[f"pass1 proxy={proxy}"] = vector_ops(c)
            c = compile_kernel(token_stats._shard_pass2_kernel, dict(common, cutoff_ptr=f32, my_ptr=f32,
                               argmax_ptr="*i64"), dict(HAS_PROXY=proxy, HAS_LABELS=True, SOFTCAP=proxy,
                                                        BLOCK_V=4096), arch)
            report[f"pass2 proxy={proxy}"] = vector_ops(c)
        print(json.dumps(report))
        """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(report) == 4
    for name, ops in report.items():
        assert "ld.global.v4.b32" in ops, f"{name}: no 16-byte loads in the PTX"
