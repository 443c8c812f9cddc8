"""verl's own trainers on the path `main_ppo` takes, with stand-ins only where CPU cannot go.

- `selected_trainer(config)`: the trainer `main_ppo` builds for a config, chosen by verl's own code:
  `main_ppo.main` (its Hydra function, undecorated: auto_set_device, validate_config, the
  `trainer.use_v1` branch) runs with `run_ppo` recording the TaskRunner it picks; for TaskRunnerV1
  its own `run` (get_trainer_cls(trainer.v1.trainer_mode), then trainer_cls(config=config) and
  trainer.init()) runs with TransferQueue's init / close as no-ops and stops inside `init` right
  after the start-up check (at `_setup`, which would start Ray workers and rollout servers). For
  the legacy TaskRunner (trainer.use_v1=False), whose `run` builds datasets and Ray pools first,
  the class it builds, RayPPOTrainer, is made without its __init__.
- `ActorWorkers`: verl's ActorRolloutRefWorker / TrainingWorker methods (compute_log_prob ->
  infer_batch, update_actor -> train_mini_batch -> train_batch), unbound, on an object holding an
  engine built as tests/integrations/verl_runs.py builds it, with the attributes init_model sets.
- `FakeTQ`: verl's TransferQueue (kv_batch_put / kv_batch_get) in memory: per key, per field, one
  tensor; a field put as a jagged nested tensor comes back as one.
- `V1WorkerGroup`: what RayWorkerGroup + verl's tqbridge do with a KVBatchMeta on one rank: fetch
  the fields, hand extra_info as batch-level entries, put a batch-sized output back.
"""

import asyncio
import contextlib
import functools
import inspect
import io
from types import SimpleNamespace

import torch
import verl_runs as V
from tensordict import TensorDict


class _Profiler:
    rank = 0

    def check_enable(self):
        return False

    def step(self):
        pass


class _NoFlops:
    """verl's FlopsCounter (the mfu metric) without a device to rate: 0 of 1."""

    def estimate_flops(self, *args, **kwargs):
        return 0.0, 1.0


class ActorWorkers:
    """verl's actor worker methods on one rank (see the module docstring)."""

    def __init__(self, engine, actor, rollout):
        from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
        from verl.workers.utils.losses import ppo_loss

        ec = engine.engine_config  # what ActorRolloutRefWorker.init_model / TrainingWorker.__init__ set
        ec.use_dynamic_bsz = actor.use_dynamic_bsz
        ec.infer_max_token_len_per_gpu = rollout.log_prob_max_token_len_per_gpu
        ec.infer_micro_batch_size_per_gpu = rollout.log_prob_micro_batch_size_per_gpu
        ec.max_token_len_per_gpu = actor.ppo_max_token_len_per_gpu
        ec.micro_batch_size_per_gpu = actor.ppo_micro_batch_size_per_gpu
        ec.use_remove_padding = engine.model_config.use_remove_padding
        ec.use_fused_kernels = engine.model_config.use_fused_kernels
        training = TrainingWorker.__new__(TrainingWorker)
        training.__dict__.update(engine=engine, engine_config=ec, model_config=engine.model_config,
                                 loss_fn=functools.partial(ppo_loss, config=actor), flops_counter=_NoFlops(),
                                 device_name="cpu", profiler=_Profiler())
        outer = ActorRolloutRefWorker.__new__(ActorRolloutRefWorker)
        outer.__dict__.update(actor=training, profiler=_Profiler(), enable_routing_replay=False)
        self.outer, self.cls = outer, ActorRolloutRefWorker

    def compute_log_prob(self, td):
        return self.cls.compute_log_prob(self.outer, td)

    def update_actor(self, td):
        return self.cls.update_actor(self.outer, td)


class _CpuDevice:
    """verl's workers log device memory counters, which torch.cpu does not have."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    def max_memory_allocated(self, *args, **kwargs):
        return 0

    max_memory_reserved = max_memory_allocated


def patch_worker_device(monkeypatch):
    import verl.workers.engine_workers as workers

    monkeypatch.setattr(workers, "get_torch_device", lambda: _CpuDevice())


class FakeTQ:
    """TransferQueue's kv_batch_put / kv_batch_get, in memory (see the module docstring)."""

    def __init__(self):
        self.rows, self.nested = {}, set()

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None, **_):
        from transfer_queue import KVBatchMeta

        for name in ([] if fields is None else list(fields.keys())):
            value = fields[name]
            if not isinstance(value, torch.Tensor):
                continue
            if value.is_nested:
                self.nested.add(name)
            for key, row in zip(keys, value.unbind(0)):
                self.rows.setdefault(key, {})[name] = row.clone()
        names = sorted(set.intersection(*(set(self.rows[k]) for k in keys)))
        return KVBatchMeta(keys=list(keys), tags=tags or [{} for _ in keys], partition_id=partition_id, fields=names)

    def kv_batch_get(self, keys, partition_id, select_fields=None, **_):
        names = select_fields or sorted(set.intersection(*(set(self.rows[k]) for k in keys)))
        out = {}
        for name in ([names] if isinstance(names, str) else names):
            rows = [self.rows[k][name] for k in keys]
            out[name] = (torch.nested.as_nested_tensor(rows, layout=torch.jagged) if name in self.nested
                         else torch.stack(rows))
        return TensorDict(out, batch_size=len(keys))

    def install(self, monkeypatch):
        import transfer_queue

        monkeypatch.setattr(transfer_queue, "kv_batch_put", self.kv_batch_put)
        monkeypatch.setattr(transfer_queue, "kv_batch_get", self.kv_batch_get)


class _ParameterVersions:
    """The worker methods verl's asynchronous trainers call around their old-log-prob pass to
    recompute it with the parameters of the last synchronisation (save_model_to_cpu /
    restore_model_from_cpu / clear_cpu_model): recorded, no-ops (one rollout, one version here)."""

    def save_model_to_cpu(self, version):
        self.calls = [*getattr(self, "calls", []), ("save", version)]

    def restore_model_from_cpu(self, version):
        self.calls = [*getattr(self, "calls", []), ("restore", version)]

    def clear_cpu_model(self, version):
        self.calls = [*getattr(self, "calls", []), ("clear", version)]


class V1WorkerGroup(_ParameterVersions):
    """The actor worker group of the v1 trainer on one rank (see the module docstring)."""

    def __init__(self, workers, tq):
        self.workers, self.tq = workers, tq

    def _call(self, method, meta):
        from verl.utils import tensordict_utils as tu

        td = self.tq.kv_batch_get(meta.keys, meta.partition_id, meta.fields)
        for key, value in (meta.extra_info or {}).items():
            tu.assign_non_tensor_data(td, key, value)
        out = method(td)
        if isinstance(out, TensorDict) and out.batch_size and out.batch_size[0] == len(meta.keys):
            return self.tq.kv_batch_put(meta.keys, meta.partition_id, out.select(
                *[k for k in out.keys() if isinstance(out[k], torch.Tensor)]), meta.tags)
        return out

    def compute_log_prob(self, meta):
        return self._call(self.workers.compute_log_prob, meta)

    def update_actor(self, meta):
        return self._call(self.workers.update_actor, meta)


class LegacyWorkerGroup(_ParameterVersions):
    """The actor worker group of RayPPOTrainer on one rank: TensorDicts in, TensorDicts out."""

    def __init__(self, workers):
        self.compute_log_prob, self.update_actor = workers.compute_log_prob, workers.update_actor


def v1_rows(batch):
    """A padded rollout batch (verl_runs.rollout_batch) -> TransferQueue's per-sample fields, as verl's
    agent loop puts them (prompts, responses, input_ids, position_ids unpadded; the response and loss masks;
    the advantages, as _compute_advantage writes them): a TensorDict of jagged nested tensors."""
    b = batch.batch
    mask = b["attention_mask"]
    cols = {k: [] for k in ("prompts", "responses", "response_mask", "input_ids", "position_ids", "advantages")}
    for i in range(mask.shape[0]):
        p = b["input_ids"][i, :V.P][mask[i, :V.P] > 0]
        r_len = int(mask[i, V.P:].sum())
        r = b["responses"][i, :r_len]
        cols["prompts"].append(p)
        cols["responses"].append(r)
        cols["response_mask"].append(torch.ones(r_len, dtype=torch.long))
        cols["input_ids"].append(torch.cat([p, r]))
        cols["position_ids"].append(torch.arange(len(p) + r_len))
        cols["advantages"].append(b["advantages"][i, :r_len].float())
    cols["loss_mask"] = cols["response_mask"]  # the agent loop stores both
    # the rollout engine's log-probs (rollout.calculate_log_probs, on by default): stand-in zeros, read
    # here only by the old-log-prob pass's debug metrics (no rollout correction is configured)
    cols["rollout_log_probs"] = [torch.zeros(len(r)) for r in cols["responses"]]
    return TensorDict({k: torch.nested.as_nested_tensor(v, layout=torch.jagged) for k, v in cols.items()},
                      batch_size=mask.shape[0])


class _Stop(Exception):
    pass


def main_ppo_runner(config, monkeypatch):
    """(the TaskRunner class verl's main_ppo.main picks for `config`, the config it hands on), after
    main's own checks (validate_config: lpreg's start-up check among them)."""
    from verl.trainer import main_ppo

    picked = {}
    monkeypatch.setattr(main_ppo, "run_ppo", lambda config, task_runner_class: picked.update(
        config=config, runner=task_runner_class))
    main_ppo.main.__wrapped__(config)
    return picked["runner"], picked["config"]


def v1_trainer(runner, config, monkeypatch):
    """The trainer TaskRunnerV1.run builds (its own get_trainer_cls and init), stopped at `_setup`."""
    import transfer_queue
    from verl.trainer.ppo.v1 import trainer_base

    def stop(self):
        raise _Stop(self)

    monkeypatch.setattr(trainer_base.PPOTrainer, "_setup", stop)
    monkeypatch.setattr(transfer_queue, "init", lambda *a, **k: None)
    monkeypatch.setattr(transfer_queue, "close", lambda *a, **k: None)
    task_runner = runner.__ray_metadata__.modified_class()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # run() prints the whole config
            task_runner.run(config)
    except _Stop as stopped:
        return stopped.args[0]
    raise AssertionError("TaskRunnerV1.run did not reach the trainer's init")


def selected_trainer(config, monkeypatch):
    """The trainer object main_ppo would train with for `config`, chosen by verl's own code."""
    from verl.trainer import main_ppo

    runner, config = main_ppo_runner(config, monkeypatch)
    if runner is main_ppo.TaskRunnerV1:
        return v1_trainer(runner, config, monkeypatch)
    from verl.trainer.main_ppo_v0 import TaskRunner

    assert runner is TaskRunner, runner
    return legacy_trainer(config)


def docs_overrides():
    """The Hydra overrides of docs/integrations.md's "Use with verl" snippet, verbatim."""
    import os
    import re

    docs = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "integrations.md")
    body = open(docs).read().split("## Use with verl", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [t for t in block.replace("\\\n", " ").split() if "=" in t and not t.startswith("python")]


def legacy_trainer(config):
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    trainer = RayPPOTrainer.__new__(RayPPOTrainer)
    trainer.config = config
    return trainer


def run_v1(trainer, engine, actor, batch, tq):
    """The v1 trainer's own _compute_old_log_prob and _update_actor on one rollout batch."""
    from transfer_queue import KVBatchMeta

    workers = ActorWorkers(engine, actor, trainer.config.actor_rollout_ref.rollout)
    trainer.actor_rollout_wg = V1WorkerGroup(workers, tq)
    keys = [f"sample_{i}" for i in range(len(batch))]
    tq.kv_batch_put(keys, "train", v1_rows(batch))
    meta = KVBatchMeta(keys=keys, tags=[{} for _ in keys], partition_id="train")
    metrics = {}
    meta = trainer._compute_old_log_prob(meta, metrics)
    meta = trainer._update_actor(meta, metrics)
    return SimpleNamespace(metrics=metrics, meta=meta, rows=tq.kv_batch_get(keys, "train"))


def run_legacy(trainer, engine, actor, batch):
    """RayPPOTrainer's own _compute_old_log_prob and _update_actor on one rollout batch."""
    trainer.actor_rollout_wg = LegacyWorkerGroup(ActorWorkers(engine, actor, trainer.config.actor_rollout_ref.rollout))
    batch.meta_info["global_token_num"] = batch.batch["attention_mask"].sum(-1).tolist()  # as RayPPOTrainer.fit
    old, _ = trainer._compute_old_log_prob(batch)
    batch = batch.union(old)
    out = trainer._update_actor(batch)
    from verl.utils.metric import reduce_metrics

    return SimpleNamespace(metrics=reduce_metrics(out.meta_info["metrics"]), batch=batch)  # as RayPPOTrainer.fit


def run_separate(trainer, engine, actor, batch):
    """A trainer built on SeparateRayPPOTrainer (one-step-off, fully async): the old-log-prob step its
    fit_step calls (_fit_compute_log_prob, through the trainer's own _compute_old_log_prob), then its
    _update_actor, on one rollout batch."""
    trainer.actor_rollout_wg = LegacyWorkerGroup(ActorWorkers(engine, actor, trainer.config.actor_rollout_ref.rollout))
    trainer.metrics, trainer.timing_raw = {}, {}
    batch.meta_info["global_token_num"] = batch.batch["attention_mask"].sum(-1).tolist()
    batch = trainer._fit_compute_log_prob(batch)
    out = trainer._update_actor(batch)
    from verl.utils.metric import reduce_metrics

    return SimpleNamespace(metrics=reduce_metrics(out.meta_info["metrics"]), batch=batch,
                           calls=getattr(trainer.actor_rollout_wg, "calls", []))


class Stop(Exception):
    pass


def started(cls, config, monkeypatch):
    """An object of the trainer class `cls` on `config`, through the class's own start-up method
    (RayPPOTrainer / SeparateRayPPOTrainer.init_workers, v1 PPOTrainer.init: lpreg's check, then
    verl's body; FullyAsyncTrainer's own async init_workers), stopped at the body's first call
    (resource pools / _setup: Ray workers)."""
    v1, separate = hasattr(cls, "_step_once"), hasattr(cls, "_init_resource_pools")
    first = "_setup" if v1 else "_init_resource_pools" if separate else "resource_pool_manager.create_resource_pool"

    def stop(*args, **kwargs):
        raise Stop()

    trainer = cls.__new__(cls)
    if v1 or separate:
        monkeypatch.setattr(cls, first, stop)
    else:  # RayPPOTrainer.init_workers starts with its resource pool manager
        trainer.resource_pool_manager = SimpleNamespace(create_resource_pool=stop)
    trainer.config = config
    start = trainer.init if v1 else trainer.init_workers
    try:
        out = start()
        if inspect.isawaitable(out):  # FullyAsyncTrainer.init_workers: a Ray actor's async method
            asyncio.run(out)
    except Stop:
        return trainer
    raise AssertionError(f"{cls.__qualname__}'s start-up method did not reach {first}")
