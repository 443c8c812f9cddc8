"""The selected tokens as text: which tokens Lp-Reg would protect, in their context.

Each example is the sampled token between `[[` and `]]` with up to `context` tokens of the response on either
side, its prompt, p_y, the kept mass m, the push 1/m - 1 and the sequence's advantage.
"""

from typing import List

import torch
from torch import Tensor

from lpreg.diagnosis.measure import Tokens
from lpreg.diagnosis.sample import Samples


def selected_examples(tokens: Tokens, selected: Tensor, kept_mass: Tensor, threshold: float, samples: Samples,
                      tokenizer, *, limit: int, context: int = 12) -> List[dict]:
    """The first `limit` selected tokens (rarest first) as dicts of text and figures."""
    at = selected.nonzero(as_tuple=True)[0]
    logp = tokens.logp[threshold]
    at = at[torch.argsort(logp[at], stable=True)][:limit]
    out = []
    for i in at.tolist():
        seq, pos = int(tokens.seq[i]), int(tokens.pos[i])
        response = samples.responses[seq]
        m = float(kept_mass[i])
        out.append({
            "question": samples.questions[seq],
            "sample": seq,
            "position": pos,
            "token": tokenizer.decode([response[pos]]),
            "context": (tokenizer.decode(response[max(0, pos - context):pos]) + "[[" + tokenizer.decode([response[pos]])
                        + "]]" + tokenizer.decode(response[pos + 1:pos + 1 + context])),
            "p_y": float(logp[i].exp()),
            "kept_mass": m,
            "push": 1.0 / m - 1.0,
            "advantage": float(tokens.adv[i]),
        })
    return out
