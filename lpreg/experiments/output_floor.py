"""The output floor: a fixed share of a uniform distribution mixed into every next-token distribution.

    p = (1 - floor) softmax(z) + floor / V

A study transform (the `noisy-sparks` presets use floor 0.25): it builds a tail that training cannot
remove, since the LM head's logits are replaced by the mixture's log-probabilities, which sampling, the
losses and the warm start all see. It also bounds the entropy from below, so entropy collapse, the failure
the paper studies, cannot happen under it; and the mass it adds is the model's by construction, not
learned. It is registered with the trainer as the output transform "output_floor"
(`lpreg.trainer.output_transform`), so a checkpoint records it and `lpreg-eval`, `--model` and resume
reinstall it: `--output-transform output_floor:floor=0.25`.
"""

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

__all__ = ["NAME", "install", "spec"]

NAME = "output_floor"


def install(model: PreTrainedModel, floor: float) -> None:
    """Mix `floor` of a uniform distribution over the vocabulary into `model`'s next-token
    distribution: a forward hook on its LM head (module docstring).

    Raises:
        ValueError: `floor` outside (0, 1).
    """
    if not isinstance(floor, (int, float)) or not 0.0 < float(floor) < 1.0:
        raise ValueError(f"floor must be in (0, 1), got {floor!r}")
    head = model.get_output_embeddings()
    log_keep, log_floor = math.log1p(-float(floor)), math.log(float(floor) / model.config.vocab_size)

    def mix(_module, _inputs, logits):
        return torch.logaddexp(F.log_softmax(logits.float(), dim=-1) + log_keep,
                               torch.tensor(log_floor, device=logits.device)).to(logits.dtype)

    head.register_forward_hook(mix)


def spec(floor: float) -> str:
    """The `--output-transform` value of a floor ("output_floor:floor=0.25")."""
    return f"{NAME}:floor={floor}"
