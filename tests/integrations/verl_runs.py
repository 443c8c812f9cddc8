"""verl actor runs for the tests: verl's FSDP engine (fsdp2, fp32) on CPU, one rank in-process or
one rank of `torchrun` (gloo), driven the way verl's trainer drives it.

A run is one rollout batch trained on as verl's PPO trainer does: the old-log-prob pass through
`RayPPOTrainer._compute_old_log_prob` (so lpreg's driver hook records the rollout proxy there),
then verl's mini-batch loop (TrainingWorker.train_mini_batch: `tu.make_iterator`, the same
non-tensor settings, one optimiser step per mini-batch), with a stand-in for the Ray worker
group that calls the engine directly on this rank's share of the batch.

Same global batch at dp = 1 and 2: verl's dispatch gives rank r the r-th contiguous half of the
batch, and each rank then takes its mini-batches in order. The one-rank run gets the rows in
the order that makes its k-th mini-batch the union of the ranks' k-th mini-batches, and the same
micro-batch size, so every micro-batch (the released form selects per micro-batch) is the same.

As a script (`torchrun --nproc_per_node 2 verl_runs.py CASES_JSON OUT`): runs every case listed
in the file CASES_JSON and writes OUT/rank{r}.json.
"""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

# siblings by their own names: a `tests` package in site-packages (verl's environment has one) would
# shadow this repository's, and the repository root on sys.path would shadow the installed lpreg
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from verl_cpu import use_cpu_platform  # noqa: E402

use_cpu_platform()

from verl import DataProto  # noqa: E402
from verl.trainer.config import CheckpointConfig  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.model import compute_position_id_with_mask  # noqa: E402
from verl.workers.config import (  # noqa: E402
    ActorConfig,
    FSDPEngineConfig,
    FSDPOptimizerConfig,
    HFModelConfig,
    PolicyLossConfig,  # noqa: E402
)
from verl.workers.engine import EngineRegistry  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

import lpreg.integrations.verl as lpreg_verl  # noqa: E402

B, P, R = 8, 4, 6  # sequences, prompt and response length
LR = 1e-2


def init(port: int = 29541) -> None:
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group("gloo")
        else:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def make_engine(path, remove_padding=True, fused=False, lr=LR, param_dtype="fp32", **model):
    """verl's FSDP2 engine (fp32) on the model at `path`; `model`: more HFModelConfig fields (LoRA);
    param_dtype: the mixed-precision policy's compute dtype ("bf16": verl's default)."""
    model_config = HFModelConfig(path=path, use_remove_padding=remove_padding, use_fused_kernels=fused,
                                 override_config={"attn_implementation": "sdpa"}, **model)
    # fp32 end to end (verl's default autocasts to bf16, where its log-probs are bf16-rounded)
    engine_config = FSDPEngineConfig(forward_only=False, strategy="fsdp2", model_dtype="fp32", use_torch_compile=False,
                                     mixed_precision={"param_dtype": param_dtype, "reduce_dtype": "fp32",
                                                      "buffer_dtype": "fp32"})
    engine = EngineRegistry.new(model_type="language_model", backend="fsdp2", model_config=model_config,
                                engine_config=engine_config, optimizer_config=FSDPOptimizerConfig(lr=lr),
                                checkpoint_config=CheckpointConfig())
    engine.initialize()
    return engine


def rollout_batch(path, seed=1) -> DataProto:
    """B left-padded prompts with responses sampled from the model (their p_y mostly in the
    proxy's kept set), a few padded response tails, +-|A| advantages per sequence."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, 40, (B, P), generator=g)
    mask = torch.ones(B, P + R, dtype=torch.long)
    mask[0, :2] = 0
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.no_grad():
        input_ids = hf.generate(prompts, attention_mask=mask[:, :P], do_sample=True, max_new_tokens=R,
                                min_new_tokens=R, pad_token_id=0, eos_token_id=1)
    mask[1, -2:] = 0
    mask[3, -5:] = 0
    mask[6, -3:] = 0
    adv = torch.randn(B, 1, generator=g).sign() * (0.2 + torch.rand(B, 1, generator=g))
    return DataProto.from_single_dict(
        {"input_ids": input_ids, "prompts": input_ids[:, :P], "attention_mask": mask,
         "position_ids": compute_position_id_with_mask(mask), "responses": input_ids[:, P:],
         "response_mask": mask[:, P:], "advantages": adv.expand(B, R) * mask[:, P:]},
        meta_info={"temperature": 1.0})


def actor_config(loss_mode="lpreg", loss_agg_mode="token-mean", mini=B, micro=2, clip_ratio_c=3.0, epochs=1,
                 policy=None, **lpreg):
    """verl's ActorConfig; `policy`: PolicyLossConfig fields both verl's loss and lpreg's read (dro_beta,
    clip_cov_lb, rollout_correction, ...)."""
    policy = dict(policy or {})
    if "rollout_correction" in policy:
        from verl.trainer.config import RolloutCorrectionConfig

        policy["rollout_correction"] = RolloutCorrectionConfig(**policy["rollout_correction"])
    policy_loss = (lpreg_verl.LpRegPolicyLossConfig(loss_mode=loss_mode, **policy, **lpreg) if loss_mode == "lpreg"
                   else PolicyLossConfig(loss_mode=loss_mode, **policy))
    return ActorConfig(strategy="fsdp2", rollout_n=1, ppo_micro_batch_size_per_gpu=micro, ppo_mini_batch_size=mini,
                       clip_ratio=0.2, clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode, ppo_epochs=epochs,
                       policy_loss=policy_loss)


class WorkerGroup:
    """Stands in for the actor's Ray worker group: `compute_log_prob` is TrainingWorker.infer_batch
    (verl's default keys, the engine's forward-only pass, model outputs + metrics) on this rank."""

    def __init__(self, engine, config: ActorConfig, fused: bool, remove_padding: bool, max_token_len=None):
        self.engine, self.config, self.fused, self.remove_padding = engine, config, fused, remove_padding
        self.max_token_len = max_token_len

    def compute_log_prob(self, td):
        defaults = dict(use_remove_padding=self.remove_padding, use_dynamic_bsz=bool(self.config.use_dynamic_bsz),
                        max_token_len_per_gpu=self.max_token_len,
                        micro_batch_size_per_gpu=self.config.ppo_micro_batch_size_per_gpu,
                        use_fused_kernels=self.fused)
        tu.assign_non_tensor(td, **{k: v for k, v in defaults.items() if k not in td.keys()})
        with self.engine.eval_mode():
            out = self.engine.infer_batch(td, loss_function=None)
        return tu.get_tensordict(tensor_dict=out["model_output"], non_tensor_dict={"metrics": {"mfu": 0.0}})


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def params(engine):
    return {k: _full(v).detach().float().clone() for k, v in engine.module.state_dict().items()}


def grads(engine):
    return {n: (None if p.grad is None else _full(p.grad).detach().float().clone())
            for n, p in engine.module.named_parameters()}


def shard(batch: DataProto, world: int, rank: int, mini: int) -> DataProto:
    """This rank's rows: verl's dispatch at dp = world; at world 1, the rows reordered so that
    mini-batch k is the union of the dp = 2 ranks' k-th mini-batches."""
    if world > 1:
        return batch.chunk(world)[rank]
    half, per = B // 2, mini // 2
    order = [r * half + k * per + j for k in range(half // per) for r in range(2) for j in range(per)]
    return batch.select_idxs(torch.tensor(order))


def run(path, case, world=1, rank=0):
    """One rollout batch trained on with the actor config `case` describes (see `train_rollouts`).
    record_selection=True: the result's "selection" lists, per micro-batch, the paper form's
    (k, n of the step, tokens of this micro-batch in the step-wide set, valid tokens here)."""
    case = dict(case)
    record_selection, record_terms = case.pop("record_selection", False), case.pop("record_terms", False)
    if record_selection or record_terms:
        import lpreg.integrations._verl_loss as loss_module

        seen, terms, real = [], [], loss_module.lpreg_regularize

        def spy(base, stats, adv, old, mask, **kw):
            sel = kw["selection_threshold"]
            if record_selection:
                seen.append([sel.k, sel.n_valid, int(sel.mask(old, mask > 0).sum()), int((mask > 0).sum())])
            out = real(base, stats, adv, old, mask, **kw)
            if record_terms:
                terms.append((out, mask > 0))
            return out

        loss_module.lpreg_regularize = spy
        try:
            result = run(path, case, world, rank)
        finally:
            loss_module.lpreg_regularize = real
        return {**result, "selection": seen if record_selection else None, "terms": terms}
    fused, rmpad = case.pop("fused", False), case.pop("remove_padding", True)
    loss_mode = case.pop("loss_mode", "lpreg")
    seed = case.pop("seed", 1)
    keep_states = case.pop("keep_states", False)
    lr, shift = case.pop("lr", LR), case.pop("old_logp_shift", 0.0)
    model = case.pop("model", {})  # more HFModelConfig fields (LoRA)
    param_dtype = case.pop("param_dtype", "fp32")
    config = actor_config(loss_mode, **case)
    torch.manual_seed(0)
    engine = make_engine(path, rmpad, fused, lr, param_dtype=param_dtype, **model)
    return train_rollouts(path, engine, config, world=world, rank=rank, rmpad=rmpad, fused=fused, seed=seed,
                          keep_states=keep_states, shift=shift)


def train_rollouts(path, engine, config, *, world=1, rank=0, rmpad=True, fused=False, seed=1, rollouts=1,
                   n_prompts=B, keep_states=False, shift=0.0, max_token_len=None):
    """`rollouts` rollout batches, verl's way (module docstring): per optimiser step (loss, grad_norm,
    metrics, gradients), the parameters after the last step, and the last batch after the
    old-log-prob pass. Responses come from the saved initial model (HF generate: no vLLM on CPU)."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    dynamic = bool(config.use_dynamic_bsz)
    mini = config.ppo_mini_batch_size * max(int(config.rollout_n), 1)  # responses (verl's driver: x rollout.n)
    rollout_state = params(engine) if keep_states else None
    steps = []
    for i in range(rollouts):
        batch = shard(rollout_batch(path, seed + i), world, rank, mini)
        trainer = SimpleNamespace(config=SimpleNamespace(actor_rollout_ref=SimpleNamespace(actor=config),
                                                         data=SimpleNamespace(train_batch_size=n_prompts)),
                                  actor_rollout_wg=WorkerGroup(engine, config, fused, rmpad, max_token_len))
        old, _ = RayPPOTrainer._compute_old_log_prob(trainer, batch)
        batch = batch.union(old)
        # a test knob: old log-probs lowered by shift x U(0, 1) per token, ratios from 1 to e^shift
        noise = torch.rand(batch.batch["old_log_probs"].shape, generator=torch.Generator().manual_seed(5))
        batch.batch["old_log_probs"] = batch.batch["old_log_probs"] - shift * noise
        loss_fn = lpreg_verl_loss(config)
        td = left_right_2_no_padding(batch.to_tensordict())
        per_gpu = mini // world
        with engine.train_mode():
            for mb in tu.make_iterator(td, mini_batch_size=per_gpu, epochs=config.ppo_epochs, seed=42,
                                       dataloader_kwargs={"shuffle": False}):
                tu.assign_non_tensor(mb, global_batch_size=mini, use_remove_padding=rmpad,
                                     use_dynamic_bsz=dynamic, max_token_len_per_gpu=max_token_len,
                                     micro_batch_size_per_gpu=config.ppo_micro_batch_size_per_gpu,
                                     use_fused_kernels=fused, calculate_entropy=config.entropy_coeff != 0,
                                     compute_loss=True)
                engine.optimizer_zero_grad()
                state = params(engine) if keep_states else None  # the weights this step's forward sees
                out = engine.forward_backward_batch(mb, loss_function=loss_fn)
                g = grads(engine)
                grad_norm = float(engine.optimizer_step())
                loss = torch.tensor(float(sum(out["loss"])))
                if world > 1:  # verl's TrainingWorker: the loss averaged over the dp group
                    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
                steps.append({"loss": float(loss), "grad_norm": grad_norm, "grads": g, "state": state,
                              "metrics": {k: metric(out["metrics"], k) for k in out["metrics"]}})
    return {"steps": steps, "params": params(engine), "batch": batch, "rollout_state": rollout_state}


def lpreg_verl_loss(config):
    import functools

    return functools.partial(ppo_loss, config=config)


def metric(metrics, key):
    """A verl metric (a Metric aggregator, or a list of per-micro-batch values) as one float."""
    v = metrics[key]
    if isinstance(v, (list, tuple)) and v and hasattr(v[0], "aggregate"):
        v = type(v[0]).aggregate_dp(v) if hasattr(type(v[0]), "aggregate_dp") else v[0]
    if hasattr(v, "aggregate"):
        v = v.aggregate()
    if isinstance(v, (list, tuple)):
        v = sum(float(x) for x in v) / max(len(v), 1)
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def from_json(d):
    t = lambda d: {k: (None if v is None else torch.tensor(v)) for k, v in d.items()}  # noqa: E731
    return {"steps": [{**s, "grads": t(s["grads"])} for s in d["steps"]], "params": t(d["params"]),
            "selection": d.get("selection")}


def to_json(result):
    flat = lambda d: {k: (None if v is None else v.reshape(-1).tolist()) for k, v in d.items()}  # noqa: E731
    steps = [{**{k: v for k, v in s.items() if k != "state"}, "grads": flat(s["grads"])} for s in result["steps"]]
    return {"steps": steps, "params": flat(result["params"]), "selection": result.get("selection")}


def main(cases_json, out_dir):
    from tiny_lm import save_tiny

    init()
    rank, world = dist.get_rank(), dist.get_world_size()
    path = os.path.join(out_dir, "tiny")
    if rank == 0:
        save_tiny(path)
    dist.barrier()
    results = [to_json(run(path, case, world, rank)) for case in json.load(open(cases_json))]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])


def compose(overrides):
    """verl's own ppo_trainer config (its Hydra YAML) with `overrides`."""
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    conf_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)
