"""Benchmark: the verl rollout record's way from the old-log-prob pass to the actor update, per step.

Synthetic, CPU: 256 prompts x 8 samples (2048 sequences), prompts of 512 tokens, responses of R
tokens (R = 1k, 2k, 4k: time should grow linearly with the tokens), micro-batches of 8 sequences,
the paper form's sparse record (k = 64: int32 indices and fp32 log q of k entries, fp32 coverage
and label log q: 8k + 8 = 520 bytes per token). Per micro-batch, as lpreg's engine does:

- worker, old-log-prob pass: the record of every packed model row (prompt rows included) ->
  `_verl_engine.to_response_layout`: the response tokens only, jagged (old_log_probs' layout); these
  tensors are what the worker hands to TransferQueue (v1) or returns to RayPPOTrainer;
- the driver (v1): nothing; it reads only the returned metadata (`_verl_driver.v1_compute_old_log_prob`);
- worker, update: `_verl_engine.response_rows`: the jagged record back to packed rows.

extra_info: R, tokens (response tokens per step), record_mb (tokens x 520 B), put_mb (bytes of the
tensors the worker hands on), put_over_record (goal <= 1.1), driver_mb (0), s_per_step,
ns_per_token. No Python loop over sequences runs in either conversion (one gather, one scatter).

Run:  pytest bench/test_bench_verl_record.py --benchmark-enable
With --benchmark-disable (CI) each case runs once on 2 micro-batches and is checked against a
per-sequence reference.
"""

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed here (its own venv)")

from lpreg.integrations import _proxy  # noqa: E402
from lpreg.integrations._verl_engine import response_rows, to_response_layout  # noqa: E402

K, PROMPT, SEQS, MICRO = 64, 512, 2048, 8
SIZES = [1024, 2048, 4096]
BYTES_PER_TOKEN = 8 * K + 8


def micro_batch(r_len: int, micro: int):
    """A v1 micro-batch's prompts / responses (jagged), lengths varying by a few tokens."""
    p_lens = [PROMPT - (b % 3) for b in range(micro)]
    r_lens = [r_len - 7 * (b % 4) for b in range(micro)]
    nested = lambda lens: torch.nested.as_nested_tensor([torch.zeros(n, dtype=torch.long) for n in lens],  # noqa: E731
                                                       layout=torch.jagged)
    return {"prompts": nested(p_lens), "responses": nested(r_lens)}, sum(p_lens) + sum(r_lens)


def record_rows(n_rows: int):
    g = torch.Generator().manual_seed(0)
    return {_proxy.SPARSE_KEYS[0]: torch.randint(0, 151936, (n_rows, K), generator=g, dtype=torch.int32),
            _proxy.SPARSE_KEYS[1]: torch.randn(n_rows, K, generator=g),
            _proxy.SPARSE_KEYS[2]: torch.rand(n_rows, generator=g),
            _proxy.ROLLOUT_LOGQ: torch.randn(n_rows, generator=g)}


def step(mb, rows, n_rows, n_micro):
    """One step's conversions: n_micro micro-batches out of the old-log-prob pass and into the update."""
    put = 0
    for _ in range(n_micro):
        out = {k: to_response_layout(v, mb) for k, v in rows.items()}  # worker: response tokens only
        put += sum(v.values().nbytes + v.offsets().nbytes for v in out.values())
        back = {k: response_rows(mb, v, n_rows, v.values()[0]) for k, v in out.items()}  # update
    return put, out, back


def reference_rows(mb, rows):
    """Per sequence (the layout rule written out): response token j of sequence b <- row end_b - len_b - 1 + j."""
    p, r = mb["prompts"].offsets().diff().tolist(), mb["responses"].offsets().diff().tolist()
    end, parts = 0, []
    for pl, rl in zip(p, r):
        end += pl + rl
        parts.append(rows[end - rl - 1:end - 1])
    return torch.cat(parts)


@pytest.mark.parametrize("r_len", SIZES)
def test_bench_record_path(benchmark, smoke, r_len):
    n_micro = 2 if smoke else SEQS // MICRO
    mb, n_rows = micro_batch(r_len if not smoke else 64, MICRO)
    rows = record_rows(n_rows)
    if smoke:
        put, out, back = step(mb, rows, n_rows, n_micro)
        index_rows = reference_rows(mb, torch.arange(n_rows))
        for k, v in rows.items():
            assert torch.equal(out[k].values(), reference_rows(mb, v))
            assert torch.equal(back[k][index_rows], v[index_rows])
        return
    result = {}
    benchmark.pedantic(lambda: result.update(put=step(mb, rows, n_rows, n_micro)[0]), rounds=1, iterations=1,
                       warmup_rounds=0)
    tokens = n_micro * int(mb["responses"].offsets()[-1])
    record = tokens * BYTES_PER_TOKEN
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(R=r_len, tokens=tokens, record_mb=record / 2**20, put_mb=result["put"] / 2**20,
                                put_over_record=result["put"] / record, driver_mb=0.0, s_per_step=seconds,
                                ns_per_token=seconds / tokens * 1e9)
    print(f"R={r_len}: {tokens} response tokens, record {record / 2**20:.0f} MiB, put {result['put'] / 2**20:.0f} MiB "
          f"({result['put'] / record:.4f}x), {seconds:.2f} s/step, {seconds / tokens * 1e9:.0f} ns/token")
    assert result["put"] <= 1.1 * record
