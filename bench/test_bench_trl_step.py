"""Benchmark: one GRPO step in TRL, with lpreg's loss against TRL's own (the headline benchmark).

A step is what a user waits for: TRL generates the completions (transformers' `generate`,
sampling), scores them, computes the loss and its backward, and takes the AdamW step. Providers:

- trl:         TRL 1.16's `GRPOTrainer` with its own loss at beta = 0 (no reference model), its
               default loss_type ("dapo");
- lpreg:       `LpRegGRPOTrainer` with Lp-Reg on (lpreg_beta = 1, the released form, its defaults),
               per-token statistics from the model's logits (lpreg_fused=False);
- lpreg_fused: the same with the statistics fused from the hidden states and the LM head
               (lpreg_fused=True, the default).

The model is a Llama built from a config (random weights, no download), untied LM head; the
tokenizer is tests/integrations/tiny_lm.py's (40 tokens: ids above those decode to nothing, so
the reward reads the completion ids), the prompts tests/integrations/trl_runs.py's. Every
completion is exactly L tokens long (generation_kwargs min_new_tokens = L), so a step always
trains on the same number of tokens. One micro-batch per optimiser step: per_device_train_batch_size
= the completions of a step, 8 generations per prompt, gradient_accumulation_steps = 1.

Shapes (layers, H, V, completions x L, steps):
- CPU (default): 2, 256, 32,000, 16 x 128, 3 steps, fp32, 2 threads (issue 25's reference shape);
- GPU (`gpu` marker, bash bench/gpu_check.sh): 2, 2048, 151,936 (Qwen's vocabulary), 16 x 512,
  3 steps, bf16 autocast (fp32 master weights; TRL's and lpreg's heads as each computes them);
- smoke (--benchmark-disable, the quick suite): 1, 32, 1,000, 8 x 8, one step, in-process.
lpreg runs its defaults (rho = 0.01, min-p kappa = 0.02) at the CPU and GPU shapes. There the random
model's distributions are near-uniform, the min-p proxy filters nothing, and the released form
(which selects a bottom-rho token only where the proxy raises its probability) selects few or no
tokens: lpreg_frac is recorded, not asserted. The step's cost does not depend on it: the trainer
computes every token's statistics (log-prob, proxy log-prob, KL, entropy) in one forward and selects
over them. The smoke shape spreads the logits (head scaled to logit std 3) and sets rho = 0.5,
kappa = 0.2, as tests/integrations/test_trl.py does, so that its 64 tokens give a selection.
LPREG_BENCH_TINY=1 runs the benchmark (subprocesses, measurement) at the smoke shape: for
`bash bench/gpu_check.sh --cpu`, which checks the machinery.

Each provider runs in a fresh interpreter (its own allocator, memory high-water mark and CUDA
context): model and trainer built, then `trainer.train()` for the steps. Recorded in extra_info:
- step_s: each optimiser step's wall time (a TrainerCallback, on_step_begin -> on_step_end:
  generation, reward, loss, backward, optimiser; CUDA synchronised), and gen_s: the part of it in
  TRL's `_generate_and_score_completions` (generation and reward);
- ms: the median step (ms), total_s: all steps (the first includes one-time costs: the optimiser's
  state, kernel compilation), train_ms: the median of step - generation (the loss's forward and
  backward, the optimiser: where the providers differ; generation is the same work for all three);
- peak_mem_mb: the peak memory growth during train() over what the built model held before it
  (bench/conftest.py's peak_memory_mb: the process's peak resident set on the CPU, the CUDA
  allocator's peak on a GPU);
- loss, grad_norm, lpreg_frac (the step's fraction of tokens Lp-Reg regularised), N (completion
  tokens per step), H, V, L, tokens_per_s (N / the median step), load1 (1-minute load at the end).

Smoke run (--benchmark-disable): each provider trains one step at the smoke shape in this process;
asserted: the step ran and logged a finite loss, every completion is L tokens long, lpreg's
providers logged the Lp-Reg metrics and selected tokens (lpreg/frac > 0), TRL's did not; and
`test_smoke_fused_matches_unfused`: on the same step (the same sampled completions, asserted)
the fused and unfused losses agree to 1e-5 (absolute) and the gradient norms to 1e-5 (relative):
both are fp32 sums of per-token terms whose log-probs come from two kernels that round the
log-sum-exp differently, a few ulp of |lse| <= ~20 (V = 1,000, logit std 3): 20 * 6e-8 * a few per
token, a mean of such terms (tests/integrations/test_trl.py states the same tolerances for its tiny
model; seen here: equal to the last bit).

    pytest bench/test_bench_trl_step.py --benchmark-enable -k cpu -s     # the CPU shape, 3 providers
    pytest -m gpu bench/test_bench_trl_step.py --benchmark-enable        # the GPU shape

Needs trl (`pip install 'lpreg[trl]'`); without it every case skips.
"""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import pytest

pytest.importorskip("trl", reason="trl is not installed here: pip install 'lpreg[trl]' (or use the TRL venv)")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integrations"))
from tiny_lm import tiny_tokenizer  # noqa: E402
from trl_runs import dataset  # noqa: E402

PROVIDERS = ["trl", "lpreg", "lpreg_fused"]
LOSS_ATOL, GRAD_RTOL = 1e-5, 1e-5  # fused vs unfused on the same step (module docstring)


@dataclass(frozen=True)
class Shape:
    layers: int
    H: int
    V: int
    L: int  # completion length (every completion is exactly L tokens)
    completions: int  # per optimiser step, one micro-batch
    generations: int  # per prompt
    steps: int
    rho: float = 0.01  # lpreg_rho and lpreg_threshold (kappa): lpreg's defaults but in the smoke run
    kappa: float = 0.02
    logit_std: float = 0.0  # 0: the random init's head (logits ~ N(0, 0.02^2 H)); else scaled to this


SMOKE = Shape(layers=1, H=32, V=1000, L=8, completions=8, generations=4, steps=1, rho=0.5, kappa=0.2, logit_std=3.0)
CPU = Shape(layers=2, H=256, V=32_000, L=128, completions=16, generations=8, steps=3)
GPU = Shape(layers=2, H=2048, V=151_936, L=512, completions=16, generations=8, steps=3)


def _conftest():
    """bench/conftest.py as a module (bench/ is not a package), for the subprocess cases."""
    spec = importlib.util.spec_from_file_location("bench_conftest", os.path.join(HERE, "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def llama(shape: Shape, tok, seed: int = 0):
    """A Llama from a config (Llama 3.2 1B's proportions: head_dim 64, 4 query heads per KV head,
    intermediate 4 H), untied LM head, random weights from `seed`, fp32.
    shape.logit_std, where set, scales the LM head to that standard deviation of the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, shape.H // 64)
    cfg = LlamaConfig(vocab_size=shape.V, hidden_size=shape.H, intermediate_size=4 * shape.H,
                      num_hidden_layers=shape.layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 4), max_position_embeddings=shape.L + 16,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    if shape.logit_std:  # the head's logits h . w ~ N(0, (0.02 |h|)^2), |h| = sqrt(H) after the final RMSNorm
        with torch.no_grad():
            model.lm_head.weight.mul_(shape.logit_std / (0.02 * shape.H ** 0.5))
    return model


def reward_from_ids(completion_ids, **kwargs):
    """A reward that varies within a group: the completion's token ids summed, mod 7."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def build_trainer(provider: str, shape: Shape, device: str, out_dir: str):
    """The trainer of `provider` on a fresh model; returns (trainer, seen) where seen collects each
    step's sampled completion ids (the reward function records them)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl import GRPOConfig, GRPOTrainer

    from lpreg.integrations.trl import LpRegGRPOConfig, LpRegGRPOTrainer

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    tok = tiny_tokenizer()
    model = llama(shape, tok)
    seen = []

    def reward(completions, completion_ids, **kwargs):
        seen.append([list(map(int, ids)) for ids in completion_ids])
        return reward_from_ids(completion_ids)

    args = dict(output_dir=out_dir, per_device_train_batch_size=shape.completions, gradient_accumulation_steps=1,
                num_generations=shape.generations, max_completion_length=shape.L,
                generation_kwargs={"min_new_tokens": shape.L}, max_steps=shape.steps, beta=0.0,
                logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                disable_dropout=True, dataloader_num_workers=0, use_cpu=device == "cpu", bf16=device == "cuda")
    if provider == "trl":
        config, trainer_cls = GRPOConfig(**args), GRPOTrainer
    else:
        config = LpRegGRPOConfig(**args, lpreg_beta=1.0, lpreg_rho=shape.rho, lpreg_threshold=shape.kappa,
                                lpreg_fused=provider == "lpreg_fused")
        trainer_cls = LpRegGRPOTrainer
    trainer = trainer_cls(model=model, reward_funcs=reward, args=config, train_dataset=dataset(),
                          processing_class=tok)
    return trainer, seen


def run_steps(provider: str, shape: Shape, device: str) -> dict:
    """Build the trainer, train `shape.steps` steps; returns the measurements (module docstring)."""
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step_s, gen_s = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            step_s.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out_dir:
        trainer, seen = build_trainer(provider, shape, device, out_dir)
        generate = trainer._generate_and_score_completions

        def timed_generate(inputs):
            sync()
            t0 = time.perf_counter()
            out = generate(inputs)
            sync()
            gen_s.append(time.perf_counter() - t0)
            return out

        trainer._generate_and_score_completions = timed_generate
        trainer.add_callback(Clock())
        peak = _conftest().peak_memory_mb(trainer.train, device)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-1] if logs else {}
    ms = statistics.median(step_s) * 1e3 if step_s else None
    rest = [t - g for t, g in zip(step_s, gen_s)]  # each step less its generation: loss, backward, optimiser
    N = shape.completions * shape.L
    return {"provider": provider, "device": device, **asdict(shape), "N": N,
            "dtype": "bfloat16" if device == "cuda" else "float32", "loss_type": trainer.loss_type,
            "threads": torch.get_num_threads() if device == "cpu" else None,
            "step_s": step_s, "gen_s": gen_s, "ms": ms, "total_s": sum(step_s),
            "train_ms": statistics.median(rest) * 1e3 if rest else None,
            "tokens_per_s": N / (ms * 1e-3) if ms else None, "peak_mem_mb": peak,
            "loss": last.get("loss"), "grad_norm": last.get("grad_norm"), "lpreg_frac": last.get("lpreg/frac"),
            "lpreg_kl": last.get("lpreg/kl"), "mean_length": last.get("completions/mean_length"),
            "logs": logs, "completion_ids": seen, "load1": os.getloadavg()[0]}


def _subprocess_case(provider: str, shape: Shape, device: str) -> dict:
    """run_steps in a fresh interpreter; its result is the stdout line that starts with RESULT."""
    cmd = [sys.executable, "-W", "ignore", os.path.abspath(__file__), provider, device, json.dumps(asdict(shape))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{provider} on {device} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


_SMOKE_RUNS: dict = {}


def smoke_run(provider: str) -> dict:
    """run_steps at the smoke shape in this process, once per provider (the comparison test reuses it)."""
    if provider not in _SMOKE_RUNS:
        _SMOKE_RUNS[provider] = run_steps(provider, SMOKE, "cpu")
    return _SMOKE_RUNS[provider]


def check_run(r: dict, shape: Shape) -> None:
    """What a step must show: it ran, its loss is finite, its completions are L tokens long, and
    lpreg's providers (only they) logged the Lp-Reg metrics."""
    assert len(r["step_s"]) == shape.steps and all(t > 0 for t in r["step_s"]), r["step_s"]
    assert len(r["logs"]) == shape.steps and all(math.isfinite(h["loss"]) for h in r["logs"]), r["logs"]
    assert r["mean_length"] == shape.L, r["mean_length"]  # min_new_tokens: N = completions x L tokens
    if r["provider"] == "trl":
        assert r["lpreg_frac"] is None  # TRL's own loss logs no Lp-Reg metrics
    else:  # Lp-Reg ran: its metrics are logged, the bottom-rho threshold is a probability
        last = r["logs"][-1]
        assert 0 < last["lpreg/threshold"] <= 1 and math.isfinite(r["lpreg_kl"]), last
        if shape == SMOKE:  # and there it selects tokens (the benchmark shapes: see the module docstring)
            assert r["lpreg_frac"] > 0, last


def _record(benchmark, r: dict, group: str) -> None:
    benchmark.group = group
    benchmark.extra_info.update({k: v for k, v in r.items() if k not in ("logs", "completion_ids")})
    print(json.dumps({k: v for k, v in benchmark.extra_info.items()}), flush=True)  # seen with -s


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cpu_trl_step(benchmark, smoke, provider):
    """Smoke: one step in-process at the smoke shape, checked. Enabled: the CPU shape (or the smoke
    shape with LPREG_BENCH_TINY=1) in a fresh interpreter, 2 threads."""
    tiny = smoke or os.environ.get("LPREG_BENCH_TINY") == "1"
    shape = SMOKE if tiny else CPU
    result = {}

    def run():
        result.update(smoke_run(provider) if smoke else _subprocess_case(provider, shape, "cpu"))

    benchmark.pedantic(run, rounds=1, iterations=1)
    check_run(result, shape)
    _record(benchmark, result, f"trl_step cpu {shape.layers}L-H{shape.H}-V{shape.V}-{shape.completions}x{shape.L}")


def test_smoke_fused_matches_unfused():
    """lpreg_fused and lpreg on the same step (same weights, same sampled completions): the same loss
    and gradient norm within LOSS_ATOL / GRAD_RTOL (module docstring)."""
    fused, unfused = smoke_run("lpreg_fused"), smoke_run("lpreg")
    assert fused["completion_ids"] == unfused["completion_ids"]  # the same step, or the comparison means nothing
    assert abs(fused["loss"] - unfused["loss"]) <= LOSS_ATOL, (fused["loss"], unfused["loss"])
    assert abs(fused["grad_norm"] - unfused["grad_norm"]) <= GRAD_RTOL * abs(unfused["grad_norm"]), \
        (fused["grad_norm"], unfused["grad_norm"])
    assert fused["lpreg_frac"] == unfused["lpreg_frac"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gpu_trl_step(benchmark, provider):
    """The GPU shape in a fresh interpreter per provider; out of GPU memory skips with the reason."""
    shape = SMOKE if os.environ.get("LPREG_BENCH_TINY") == "1" else GPU
    result = {}

    def run():
        result.update(_subprocess_case(provider, shape, "cuda"))

    benchmark.pedantic(run, rounds=1, iterations=1)
    if result.get("oom"):
        pytest.skip(f"{provider}: out of GPU memory at {shape}: {result['oom']}")
    check_run(result, shape)
    _record(benchmark, result, f"trl_step cuda {shape.layers}L-H{shape.H}-V{shape.V}-{shape.completions}x{shape.L}")


def main(provider: str, device: str, shape_json: str) -> None:
    shape = Shape(**json.loads(shape_json))
    if device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        r = run_steps(provider, shape, device)
    except torch.cuda.OutOfMemoryError as e:
        r = {"provider": provider, "device": device, "oom": str(e).splitlines()[0]}
    r.pop("completion_ids", None)
    print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":  # provider device shape_json: one case, its result on the RESULT line
    main(*sys.argv[1:4])
