"""Every Triton kernel compiles, ahead of time, for A100 (sm_80) and H100/H200 (sm_90) down to
a cubin, on this GPU-less machine; the hot loops use 16-byte global loads and stores, and no
kernel spills registers.

The interpreter (TRITON_INTERPRET=1) checks the kernels' numbers but not that the compiler
accepts them (type agreement across runtime branches and loops, for instance), nor what code
it emits. Compiling runs in a subprocess because the interpreter flag is process-wide.
Pointer, stride and V arguments are marked divisible by 16, as Triton's launcher specialises
them at run time for 16-aligned rows (V = 151,936 and 32,000 are; 50,257 is not).
"""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    r"""
    import itertools, json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from lpreg.kernels import sparse_proxy_stats, token_stats

    import inspect

    # Triton >= 3.3 takes constexprs and per-argument attrs; Triton 3.2 (torch 2.6's) constants and an
    # AttrsDescriptor of (argument index, value) hints
    NEW_API = "constexprs" in inspect.signature(triton.compiler.ASTSource.__init__).parameters

    def compile_kernel(fn, types, consts, arch, num_warps=8):
        sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
        div = [(i,) for i, n in enumerate(fn.arg_names)
               if sig[n].startswith("*") or n.endswith("stride") or n in ("V", "K")]
        if NEW_API:
            src = triton.compiler.ASTSource(
                fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()},
                attrs={d: [["tt.divisibility", 16]] for d in div})
        else:
            from triton.backends.compiler import AttrsDescriptor

            src = triton.compiler.ASTSource(fn=fn, signature=sig, constants=dict(consts),
                                            attrs=AttrsDescriptor.from_hints({i: 16 for (i,) in div}))
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})

    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def local_bytes(cubin):
        # register spills go to local memory: the cubin's resource usage says how much
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(cubin)
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        return [int(v) for v in re.findall(r"LOCAL:(\d+)", out)]

    def vector_ops(c):
        assert local_bytes(c.asm["cubin"]) == [0], "the kernel spills registers to local memory"
        return sorted(set(re.findall(r"(?:ld|st)\.global\.v4\.b32", c.asm["ptx"])))

    arch, dt = int(sys.argv[1]), sys.argv[2]
    f32 = "*fp32"
    report = {}
    fwd_types = dict(logp_ptr=f32, proxy_logp_ptr=f32, kl_ptr=f32, entropy_ptr=f32, row_stats_ptr=f32,
                     logits_ptr="*" + dt, proxy_ptr="*" + dt, labels_ptr="*i64", V="i32",
                     logits_row_stride="i64", proxy_row_stride="i64", inv_temperature="fp32", softcap="fp32",
                     log_threshold="fp32", ignore_index="i32")
    for proxy, labels, fixed in itertools.product([False, True], repeat=3):
        c = compile_kernel(token_stats._token_stats_fwd_kernel, fwd_types,
                           dict(HAS_PROXY=proxy, HAS_LABELS=labels, FIXED=fixed, SOFTCAP=False, BLOCK_V=4096,
                                MAX_BLOCKS=64), arch)
        report[f"token_stats_fwd proxy={proxy} labels={labels} fixed={fixed}"] = vector_ops(c)
    for proxy in (False, True):  # the logit transform's soft-cap (issue 30)
        c = compile_kernel(token_stats._token_stats_fwd_kernel, fwd_types,
                           dict(HAS_PROXY=proxy, HAS_LABELS=True, FIXED=True, SOFTCAP=True, BLOCK_V=4096,
                                MAX_BLOCKS=64), arch)
        report[f"token_stats_fwd proxy={proxy} softcap"] = vector_ops(c)
    bwd_types = dict(grad_ptr="*" + dt, logits_ptr="*" + dt, proxy_ptr="*" + dt, labels_ptr="*i64",
                     row_stats_ptr=f32, g_logp_ptr=f32, g_kl_ptr=f32, g_entropy_ptr=f32, V="i32",
                     logits_row_stride="i64", proxy_row_stride="i64", grad_row_stride="i64",
                     inv_temperature="fp32", softcap="fp32", ignore_index="i32", vocab_offset="i64")
    for proxy, gl, gk, gh in itertools.product([False, True], repeat=4):
        c = compile_kernel(token_stats._token_stats_bwd_kernel, bwd_types,
                           dict(HAS_PROXY=proxy, HAS_LABELS=True, HAS_G_LOGP=gl, HAS_G_KL=gk, HAS_G_ENTROPY=gh,
                                SOFTCAP=False, BLOCK_V=4096), arch)
        report[f"token_stats_bwd proxy={proxy} g={gl}{gk}{gh}"] = vector_ops(c)
    for proxy in (False, True):
        c = compile_kernel(token_stats._token_stats_bwd_kernel, bwd_types,
                           dict(HAS_PROXY=proxy, HAS_LABELS=True, HAS_G_LOGP=True, HAS_G_KL=True, HAS_G_ENTROPY=True,
                                SOFTCAP=True, BLOCK_V=4096), arch)
        report[f"token_stats_bwd proxy={proxy} softcap"] = vector_ops(c)
    sp_types = dict(logp_ptr=f32, proxy_logp_ptr=f32, kl_ptr=f32, entropy_ptr=f32, row_stats_ptr=f32,
                    grad_ptr="*" + dt, logits_ptr="*" + dt, labels_ptr="*i64", idx_ptr="*i64", logq_ptr=f32,
                    label_logq_ptr=f32,
                    g_logp_ptr=f32, g_kl_ptr=f32, g_entropy_ptr=f32, V="i32", K="i32",
                    logits_row_stride="i64", idx_row_stride="i64", logq_row_stride="i64", grad_row_stride="i64",
                    inv_temperature="fp32", softcap="fp32", ignore_index="i32", vocab_offset="i64")
    for cap in (False, True):
        c = compile_kernel(sparse_proxy_stats._sparse_proxy_fwd_kernel, sp_types,
                           dict(HAS_LABELS=True, HAS_LABEL_LOGQ=True, SOFTCAP=cap, BLOCK_V=4096, BLOCK_K=64), arch)
        report["sparse_proxy_fwd" + (" softcap" if cap else "")] = vector_ops(c)
        c = compile_kernel(sparse_proxy_stats._sparse_proxy_bwd_kernel, sp_types,
                           dict(HAS_LABELS=True, SOFTCAP=cap, HAS_G_LOGP=True, HAS_G_KL=True, HAS_G_ENTROPY=True,
                                BLOCK_V=4096, BLOCK_K=64), arch)
        report["sparse_proxy_bwd" + (" softcap" if cap else "")] = vector_ops(c)
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpus_with_vector_memory_ops(arch, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh compile, not a cached one
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(arch), "bf16"], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(report) == 8 + 2 + 16 + 2 + 2 + 2  # the last of each: the soft-cap (issue 30)
    for name, ops in report.items():
        if name.endswith("g=FalseFalseFalse"):  # no upstream gradient: zeros, nothing to read
            assert ops == ["st.global.v4.b32"], (name, ops)
            continue
        assert "ld.global.v4.b32" in ops, f"{name}: no 16-byte loads in the PTX"
        if "bwd" in name:
            assert "st.global.v4.b32" in ops, f"{name}: the gradient is not written with 16-byte stores"
