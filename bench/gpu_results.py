"""The measurements and the results files of bench/gpu_check.sh.

    python bench/gpu_results.py copy   --out copy.json   [--cpu]   # device-to-device copy bandwidth
    python bench/gpu_results.py matmul --out matmul.json [--cpu]   # bf16 matmul rate, fused-linear GEMMs
    python bench/gpu_results.py report --state DIR --results-dir DIR [--command CMD]

`report` reads what the steps left in the state directory (steps.tsv: each step's exit
status and seconds; copy.json; matmul.json; bench-*.json: pytest-benchmark JSON) and writes
<results-dir>/<device>.json (environment, steps, every benchmark row) and <device>.md (the
same as a Markdown table, for README to include). <device> is the device name in lower case
with runs of other characters as '-' ("NVIDIA H200" -> "nvidia-h200").

Derived columns: `of copy` = a row's gbps over the measured copy bandwidth (both count
bytes read + written); `of matmul` = a row's tflops over the measured bf16 matmul rate on the
same 6 N H V flops. The fused-linear target of issue 11 is `of matmul` >= 0.70 for the fused
provider at N = 8192, H = 4096, V = 151,936.

--cpu runs copy and matmul on the CPU with tiny shapes: it checks the machinery on a machine
without a GPU; its figures mean nothing.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

FUSED_LINEAR_TARGET = 0.70  # issue 11: fused linear at >= 70 % of the measured bf16 matmul rate
GPU_SHAPE = (8192, 4096, 151_936)  # N, H, V of bench/test_bench_fused_linear.py's GPU case
CPU_SHAPE = (64, 32, 256)  # --cpu: the machinery only


def slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _median_ms(step, reps, cuda):
    """bench/conftest.py's `median_ms`, loaded by path (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_conftest", os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest.median_ms(step, reps, cuda)


def measure_copy(cpu: bool = False) -> dict:
    """Copy bandwidth: one buffer copied into another, bytes read + written over the median time."""
    import torch

    device = "cpu" if cpu else "cuda"
    n = 2**20 if cpu else 2**30  # 1 MiB / 1 GiB
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), reps=10, cuda=not cpu)
    return {"bytes": n, "ms": ms, "gbps": 2 * n / (ms * 1e-3) / 1e9}


def measure_matmul(cpu: bool = False) -> dict:
    """bf16 matmul rate on the three GEMMs of a linear layer's forward + backward at (N, H, V).

    logits = h W^T (N x V, inner H), grad_h = g W (N x H, inner V), grad_W = g^T h (V x H,
    inner N): 2 N H V flops each, 6 N H V together, the flops the fused-linear benchmark counts.
    """
    import torch

    N, H, V = CPU_SHAPE if cpu else GPU_SHAPE
    device = "cpu" if cpu else "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, H, device=device, generator=gen).to(torch.bfloat16)
    w = torch.randn(V, H, device=device, generator=gen).to(torch.bfloat16)
    g = torch.randn(N, V, device=device, generator=gen).to(torch.bfloat16)
    gemms = {"h_wT": lambda: h @ w.T, "g_w": lambda: g @ w, "gT_h": lambda: g.T @ h}
    ms = {name: _median_ms(fn, reps=10, cuda=not cpu) for name, fn in gemms.items()}
    total = sum(ms.values())
    return {"N": N, "H": H, "V": V, "dtype": "bfloat16", "gemm_ms": ms, "ms": total,
            "tflops": 6 * N * H * V / (total * 1e-3) / 1e12}


# ---- the report -------------------------------------------------------------------------

def _run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_revision(root):
    rev = _run(["git", "-C", root, "rev-parse", "HEAD"])
    if rev is None:
        return "unknown"
    dirty = _run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"])
    return rev + ("-dirty" if dirty else "")


def _driver():
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if smi:
        return smi.splitlines()[0].strip()
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:  # any failure (no pynvml, no driver) means "not known here"
        return None


def _nvcc():
    out = _run(["nvcc", "--version"])
    m = re.search(r"release ([\d.]+)", out or "")
    return m.group(1) if m else None


def environment(root: str, cpu: bool) -> dict:
    """Device, driver and software versions, and the git revision of the tree measured."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": triton_version,
           "nvcc": _nvcc(), "python": platform.python_version(), "git_revision": _git_revision(root),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if cpu or not torch.cuda.is_available():
        env.update(device=f"cpu {platform.machine()}", driver=None, capability=None, sm_count=None)
    else:
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), driver=_driver(),
                   capability="%d.%d" % torch.cuda.get_device_capability(0), sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
    return env


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def benchmark_rows(bench_json: dict, source: str, copy_gbps=None, matmul_tflops=None) -> list:
    """One row per benchmark of a pytest-benchmark JSON: its extra_info plus derived columns."""
    rows = []
    for b in (bench_json or {}).get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        stats = b.get("stats") or {}
        row = {"source": source, "name": b.get("name"), "group": b.get("group")}
        row.update(info)
        if row.get("ms") is None and stats.get("median") is not None:
            row["ms"] = stats["median"] * 1e3
        row["rounds"] = stats.get("rounds")
        gbps, tflops = info.get("gbps"), info.get("tflops")
        row["of_copy"] = gbps / copy_gbps if gbps and copy_gbps else None
        row["of_matmul"] = tflops / matmul_tflops if tflops and matmul_tflops else None
        rows.append(row)
    return rows


def read_steps(path: str) -> dict:
    """steps.tsv (name, exit status, seconds; one line a step) as {name: {rc, seconds}}, in run order."""
    order = ["install", "copy", "matmul", "tests", "bench-token-stats", "bench-fused-linear", "bench-trl-step",
             "bench-other"]
    steps = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 3:
                    steps[parts[0]] = {"rc": int(parts[1]), "seconds": int(parts[2])}
    except OSError:
        return {}
    return dict(sorted(steps.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def build_report(state: str, root: str, command: str, cpu: bool) -> dict:
    """Everything the steps left in `state`, with the environment, as one dict."""
    copy = _load(os.path.join(state, "copy.json"))
    matmul = _load(os.path.join(state, "matmul.json"))
    copy_gbps = copy.get("gbps") if copy else None
    matmul_tflops = matmul.get("tflops") if matmul else None
    rows = []
    sources = [n[:-5] for n in os.listdir(state) if n.startswith("bench-") and n.endswith(".json")]
    first = ["bench-token-stats", "bench-fused-linear", "bench-trl-step", "bench-other"]  # the steps' order
    for source in sorted(sources, key=lambda s: (first.index(s) if s in first else len(first), s)):
        rows += benchmark_rows(_load(os.path.join(state, source + ".json")), source, copy_gbps, matmul_tflops)
    # the target is for the matmul's own shape: rows that name another (N, H, V) do not count
    shape = tuple(matmul.get(k) for k in ("N", "H", "V")) if matmul else None
    fused = [r for r in rows if r.get("provider") == "fused" and r.get("of_matmul") is not None
             and (r.get("N") is None or tuple(r.get(k) for k in ("N", "H", "V")) == shape)]
    target = None
    if fused:
        value = max(r["of_matmul"] for r in fused)
        target = {"fused_linear_over_matmul": value, "target": FUSED_LINEAR_TARGET,
                  "met": value >= FUSED_LINEAR_TARGET}
    steps = read_steps(os.path.join(state, "steps.tsv"))
    return {"environment": environment(root, cpu), "command": command, "steps": steps,
            "total_seconds": sum(s.get("seconds", 0) for s in steps.values()),
            "copy": copy, "matmul": matmul, "fused_linear_target": target, "rows": rows}


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _shape(r):
    dims = [f"{r[k]:,}" for k in ("N", "H", "V") if isinstance(r.get(k), int)]
    softcap = f" softcap {r['logit_softcap']:g}" if r.get("logit_softcap") else ""  # issue 30's Gemma-style rows
    return " × ".join(dims) + (f" {r['dtype']}" if r.get("dtype") else "") + softcap


def trl_step_lines(rows: list) -> list:
    """The headline of bench/test_bench_trl_step.py, one line per shape: a GRPO step in TRL with
    TRL's own loss against LpRegGRPOTrainer (unfused, fused): the median step and the peak memory."""
    groups = {}
    for r in rows:
        if (r.get("group") or "").startswith("trl_step") and r.get("provider"):
            groups.setdefault(r["group"], {})[r["provider"]] = r
    out = []
    labels = (("trl", "TRL's own loss (beta 0)"), ("lpreg", "lpreg unfused"), ("lpreg_fused", "lpreg fused"))
    for by in groups.values():
        trl = by.get("trl")
        if not trl or not trl.get("ms"):
            continue
        r0 = next(iter(by.values()))
        parts = []
        for p, label in labels:
            r = by.get(p)
            if r and r.get("ms"):
                speed = "" if p == "trl" else f", {trl['ms'] / r['ms']:.2f}x TRL's speed"
                rest = f" ({r['train_ms'] / 1e3:.2f} s without generation)" if r.get("train_ms") else ""
                parts.append(f"{label} {r['ms'] / 1e3:.2f} s{rest}{speed}, "
                             f"peak +{_fmt(r.get('peak_mem_mb'), ',.0f')} MiB")
        out.append(f"GRPO step in TRL ({r0.get('layers')} layers, H = {r0.get('H'):,}, V = {r0.get('V'):,}, "
                   f"{r0.get('completions')} x {r0.get('L')} completion tokens, {r0.get('dtype')}, generation "
                   f"included; median of {len(r0.get('step_s') or [])} steps): " + "; ".join(parts) + ".")
    return ["", *out] if out else []


def markdown(report: dict) -> str:
    """The report as Markdown: a header naming machine, software and command, then one table."""
    env = report["environment"]
    rev = env["git_revision"]
    dirty = " (with uncommitted changes)" if rev.endswith("-dirty") else ""
    lines = [f"<!-- written by bench/gpu_check.sh ({report['command']}): do not edit by hand -->",
             f"**{env['device']}**, driver {env.get('driver') or '-'}; torch {env['torch']} "
             f"(CUDA {env.get('torch_cuda') or '-'}), triton {env.get('triton') or '-'}, "
             f"nvcc {env.get('nvcc') or '-'}; lpreg `{rev[:12]}`{dirty}; {env['date']}.", ""]
    steps = ", ".join(f"{k} {v.get('seconds', 0):.0f} s{'' if v.get('rc') == 0 else ' FAILED rc=%s' % v.get('rc')}"
                      for k, v in report["steps"].items())
    lines += [f"Command: `{report['command']}`, {report['total_seconds']:.0f} s in all ({steps or 'no steps'}).", ""]
    copy, mm = report.get("copy"), report.get("matmul")
    if copy:
        lines.append(f"Copy bandwidth: {copy['gbps']:.0f} GB/s ({copy['bytes'] / 2**20:.0f} MiB copied, "
                     "bytes read + written).")
    if mm:
        lines.append(f"bf16 matmul: {mm['tflops']:.1f} TFLOP/s on the three GEMMs of a linear layer at "
                     f"N = {mm['N']:,}, H = {mm['H']:,}, V = {mm['V']:,} (6 N H V flops in {mm['ms']:.2f} ms).")
    lines += ["", "| benchmark | provider | shape | ms | throughput | of copy | of matmul | peak MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        rate = (f"{r['gbps']:.0f} GB/s" if r.get("gbps") else
                f"{r['tflops']:.1f} TFLOP/s" if r.get("tflops") else
                f"{r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s") else "-")
        lines.append(f"| {r.get('group') or r['name']} | {r.get('provider', '-')} | {_shape(r) or '-'} | "
                     f"{_fmt(r.get('ms'), '.2f')} | {rate} | {_fmt(r.get('of_copy'), '.2f')} | "
                     f"{_fmt(r.get('of_matmul'), '.2f')} | {_fmt(r.get('peak_mem_mb'), '.0f')} |")
    lines += trl_step_lines(report["rows"])
    t = report.get("fused_linear_target")
    if t:
        lines += ["", f"Fused linear: {t['fused_linear_over_matmul']:.2f} of the measured bf16 matmul rate "
                      f"(target >= {t['target']:.2f}: {'met' if t['met'] else 'NOT met'})."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, results_dir: str) -> tuple:
    """Write <device>.json and <device>.md into results_dir; returns their paths."""
    os.makedirs(results_dir, exist_ok=True)
    base = os.path.join(results_dir, slug(report["environment"]["device"]))
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    with open(base + ".md", "w") as f:
        f.write(markdown(report))
    return base + ".json", base + ".md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("copy", "matmul"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        s.add_argument("--cpu", action="store_true")
    s = sub.add_parser("report")
    s.add_argument("--state", required=True)
    s.add_argument("--results-dir", required=True)
    s.add_argument("--command", default="bash bench/gpu_check.sh")
    s.add_argument("--cpu", action="store_true")
    a = p.parse_args(argv)
    if a.cmd in ("copy", "matmul"):
        result = (measure_copy if a.cmd == "copy" else measure_matmul)(a.cpu)
        with open(a.out, "w") as f:
            json.dump(result, f)
        print(json.dumps(result))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    report = build_report(a.state, root, a.command, a.cpu)
    paths = write_report(report, a.results_dir)
    sys.stdout.write(markdown(report))
    print("written: " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
