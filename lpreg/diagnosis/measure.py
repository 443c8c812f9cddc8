"""The measurement: the policy's statistics at every sampled response token, then Lp-Reg's selection at
every (kappa, rho) of the grid, call by call as the loss makes it.

    forward   one no-grad forward per loss call; `lpreg_token_stats` at each kappa gives log p_y and the
              proxy's log q_y (docs/spec.md §1-2): q = p / m on the kept set K, so m = p_y / q_y
    select    per call and rho, the loss core's per-token result (`LossTerms`: candidate, selected,
              filtered, kept_mass) for the user's form, summed with `mechanism_sums` (docs/spec.md §3)

The figures per cell (`Cell`):
    selected per 1,000 response tokens;
    filtered share: candidates (the lowest-rho set) whose sampled token is outside K (q_y = 0), so that the
        proxy has nothing to pull towards: Lp-Reg's "noise", never protected;
    kept mass m and push 1/m - 1 at the selected tokens: k3 at a selected token raises its logit by
        (1/m - 1)(1 - p_y)/T per unit of beta (docs/spec.md §3a), against the negative-advantage update's
        |A| (1 - p_y)/T, so `push_ratio` = beta (1/m - 1)/|A| is the penalty's share of that update (the
        paper form's full KL raises it by p_y (1/m - 1)/T only: its ratio is beta p_y (1/m - 1)/(|A| (1 - p_y))).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from lpreg.diagnosis.sample import Samples
from lpreg.regularize import LossTerms, lpreg_regularize, mechanism_sums
from lpreg.selection import bottom_k_count
from lpreg.token_stats import TokenStats, lpreg_token_stats
from lpreg.trainer.rollout import pack


@dataclass
class Tokens:
    """Every sampled response token, flattened in call order, on the CPU."""

    call: Tensor  # (n,) int64: the loss call that holds it
    seq: Tensor  # (n,) int64: the sequence (sample) index
    pos: Tensor  # (n,) int64: its position in the response
    label: Tensor  # (n,) int64: the sampled token
    adv: Tensor  # (n,) fp32: its sequence's advantage
    logp: Dict[float, Tensor] = field(default_factory=dict)  # kappa -> (n,) fp32 log p_y (the same for every kappa)
    proxy_logp: Dict[float, Tensor] = field(default_factory=dict)  # kappa -> (n,) fp32 log q_y (-inf: filtered)

    @property
    def n_calls(self) -> int:
        return int(self.call.max()) + 1 if self.call.numel() else 0


def split_calls(lengths: Sequence[int], tokens_per_call: int) -> List[List[int]]:
    """Consecutive sequences packed into loss calls of at most `tokens_per_call` response tokens (a longer
    sequence is a call of its own): what a micro-batch of that many tokens holds."""
    calls: List[List[int]] = []
    current: List[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > tokens_per_call:
            calls.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        calls.append(current)
    return calls


@torch.no_grad()
def token_statistics(model, samples: Samples, calls: List[List[int]], *, thresholds: Sequence[float], mode: str,
                     temperature: float, backend: str, batch_size: int = 8,
                     on_call: Optional[Callable[[], None]] = None) -> Tokens:
    """One forward per call (in batches of `batch_size` sequences) and the token statistics at each kappa."""
    device = next(model.parameters()).device
    parts: Dict[str, List[Tensor]] = {k: [] for k in ("call", "seq", "pos", "label", "adv")}
    logp: Dict[float, List[Tensor]] = {t: [] for t in thresholds}
    proxy: Dict[float, List[Tensor]] = {t: [] for t in thresholds}
    for c, call in enumerate(calls):
        for start in range(0, len(call), batch_size):
            idx = call[start:start + batch_size]
            batch = pack([samples.prompt_ids[i] for i in idx], [samples.responses[i] for i in idx],
                         samples.pad_id).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            valid = batch.loss_mask > 0  # (b, L - 1): position t predicts response token t + 1
            rows = logits[:, :-1][valid]  # (n, V): only the response positions
            labels = batch.labels[valid]
            for t in thresholds:
                st = lpreg_token_stats(rows, labels, temperature=temperature, mode=mode, threshold=t, backend=backend)
                logp[t].append(st.logp.float().cpu())
                proxy[t].append(st.proxy_logp.float().cpu())
            b_idx, t_idx = valid.nonzero(as_tuple=True)
            seq = torch.tensor(idx, dtype=torch.long)[b_idx.cpu()]
            prompt_len = torch.tensor([len(samples.prompt_ids[i]) for i in idx], dtype=torch.long)[b_idx.cpu()]
            parts["call"].append(torch.full_like(seq, c))
            parts["seq"].append(seq)
            parts["pos"].append(t_idx.cpu() + 1 - prompt_len)  # target index t + 1, minus the prompt
            parts["label"].append(labels.cpu())
            parts["adv"].append(samples.advantages[seq].float())
        if on_call is not None:
            on_call()

    def cat(xs: List[Tensor], dtype: torch.dtype) -> Tensor:
        return torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)

    return Tokens(call=cat(parts["call"], torch.long), seq=cat(parts["seq"], torch.long),
                  pos=cat(parts["pos"], torch.long), label=cat(parts["label"], torch.long),
                  adv=cat(parts["adv"], torch.float32),
                  logp={t: cat(v, torch.float32) for t, v in logp.items()},
                  proxy_logp={t: cat(v, torch.float32) for t, v in proxy.items()})


def call_terms(logp: Tensor, proxy_logp: Tensor, adv: Tensor, *, compat: str, rho: float) -> LossTerms:
    """The loss core's per-token result (`lpreg.lpreg_regularize`, docs/spec.md §3) for one loss call of n
    tokens, on-policy: candidate (released: the k = int(rho n_neg) smallest p_y among the A < 0 tokens; paper:
    the k = max(1, int(rho n)) smallest of all), selected (released: also k > 1 and y kept with m < 1; paper:
    also A < 0 and y kept), filtered (y outside K), kept_mass (m = p_y / q_y, NaN where filtered), p_y.
    Each field (n,). The base loss is irrelevant to the selection: 0."""
    zeros = torch.zeros(1, logp.numel())
    stats = TokenStats(logp[None], proxy_logp[None], zeros, zeros)
    out = lpreg_regularize(zeros, stats, adv[None], None, torch.ones_like(zeros), compat=compat, rho=rho, beta=1.0)
    return LossTerms(*(t[0] for t in out))


@dataclass
class Cell:
    """The figures at one (kappa, rho) over every call."""

    threshold: float
    rho: float
    response_tokens: int
    negative_tokens: int
    calls: int
    calls_selecting: int  # calls where the form can select at all (released: k > 1)
    candidates: int
    filtered: int  # candidates whose sampled token the proxy filters
    selected: int
    kept_mass: Optional[float]  # means over the selected tokens; None when none is selected
    push: Optional[float]
    p_y: Optional[float]
    push_ratio: Optional[float]

    @property
    def selected_per_1000(self) -> float:
        return 1000.0 * self.selected / max(1, self.response_tokens)

    @property
    def filtered_share(self) -> Optional[float]:
        return self.filtered / self.candidates if self.candidates else None

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "rho": self.rho, "selected_per_1000": self.selected_per_1000,
                "filtered_share": self.filtered_share, **{k: getattr(self, k) for k in (
                    "response_tokens", "negative_tokens", "calls", "calls_selecting", "candidates", "filtered",
                    "selected", "kept_mass", "push", "p_y", "push_ratio")}}


def measure_cell(tokens: Tokens, threshold: float, rho: float, *, compat: str, beta: float
                 ) -> Tuple[Cell, Tensor, Tensor]:
    """The cell's figures, and the selected tokens' mask (n,) and kept mass (n,)."""
    logp, proxy = tokens.logp[threshold], tokens.proxy_logp[threshold]
    n = logp.numel()
    selected = torch.zeros(n, dtype=torch.bool)
    kept = torch.full((n,), float("nan"))
    sums: Dict[str, float] = {}
    calls_selecting = 0
    for c in range(tokens.n_calls):
        at = (tokens.call == c).nonzero(as_tuple=True)[0]
        terms = call_terms(logp[at], proxy[at], tokens.adv[at], compat=compat, rho=rho)
        selected[at] = terms.selected
        kept[at] = terms.kept_mass
        for key, value in mechanism_sums(terms, torch.ones_like(terms.selected)).items():  # additive over calls
            sums[key] = sums.get(key, 0.0) + float(value)
        n_neg = int((tokens.adv[at] < 0).sum())
        calls_selecting += int(compat == "paper" or bottom_k_count(n_neg, rho) > 1)  # released: k > 1
    m, p_y, a = kept[selected].double(), logp[selected].double().exp(), tokens.adv[selected].double().abs()
    push = 1.0 / m - 1.0
    # the penalty's push on y's logit against the negative-advantage update |A| (1 - p_y), per unit of T
    ratio = beta * push / a if compat == "released" else beta * p_y * push / (a * (1.0 - p_y))

    def mean(x: Tensor) -> Optional[float]:
        return float(x.mean()) if x.numel() else None

    cell = Cell(threshold=threshold, rho=rho, response_tokens=n, negative_tokens=int((tokens.adv < 0).sum()),
                calls=tokens.n_calls, calls_selecting=calls_selecting, candidates=round(sums.get("candidates", 0.0)),
                filtered=round(sums.get("filtered", 0.0)), selected=int(selected.sum()), kept_mass=mean(m),
                push=mean(push), p_y=mean(p_y),
                push_ratio=mean(ratio))
    return cell, selected, kept
