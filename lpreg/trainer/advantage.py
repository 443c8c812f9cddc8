"""GRPO advantages: the outcome reward, centred within its group, optionally scaled.

For rewards R of shape (n_groups * group_size,), laid out group by group:

    A_i = (R_i - mean_group(R)) / (std + eps)

where `std` is the group's (std_scaling="group", GRPO), the whole batch's ("batch",
as in REINFORCE++ / Dr. GRPO-style variants), or 1 ("none", Dr. GRPO). The std is the
unbiased sample std (torch.std, as in verl's GRPO estimator). A group whose rewards are
all equal carries no signal: its advantages are exactly zero whatever the scaling, and the
fraction of such groups is logged as `train/frac_reward_zero_std`.
"""

import torch

__all__ = ["group_advantages"]


def group_advantages(rewards, group_size, *, std_scaling="group", eps=1e-6) -> tuple[torch.Tensor, dict]:
    """rewards: (B,) with B = n_groups * group_size, grouped contiguously.

    Returns (advantages (B,) fp32, metrics dict). Each sequence's advantage is broadcast
    to its tokens by the caller.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-d with a length divisible by group_size={group_size}, got shape {tuple(rewards.shape)}"
        )
    if std_scaling not in ("group", "batch", "none"):
        raise ValueError(f"std_scaling must be 'group', 'batch' or 'none', got {std_scaling!r}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    # zero-std groups: detect by exact equality (a float std of equal values may not be 0.0)
    zero_std = (grouped == grouped[:, :1]).all(dim=1)
    if std_scaling == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    elif std_scaling == "batch":
        std = rewards.std().expand(grouped.shape[0], 1) if rewards.numel() > 1 else torch.zeros(grouped.shape[0], 1)
    else:
        std = torch.ones_like(grouped[:, :1]) - eps
    adv = centred / (std + eps)
    adv = torch.where(zero_std[:, None], torch.zeros_like(adv), adv)
    metrics = {
        "train/frac_reward_zero_std": zero_std.float().mean().item(),
        "critic/advantages/mean": adv.mean().item(),
        "critic/advantages/max": adv.max().item(),
        "critic/advantages/min": adv.min().item(),
    }
    return adv.reshape(-1), metrics
