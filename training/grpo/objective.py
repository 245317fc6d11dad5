"""The GRPO objective: group-relative advantages, the clipped surrogate loss over model-written tokens, the
training pass's token log-probabilities, and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..common import IGNORE_INDEX


def group_advantages(totals: Sequence[float], group_size: int, scale: str = "group") -> list[float]:
    """A_i = (r_i - mean of its group) [/ (std of its group + 1e-4) when scale == "group"], groups of `group_size`
    consecutive rewards (GRPO, paper eq. 6). A group whose rewards are all equal gets zero advantages."""
    r = np.asarray(totals, dtype=np.float64)
    if len(r) % group_size:
        raise ValueError(f"{len(r)} rewards do not split into groups of {group_size}")
    g = r.reshape(-1, group_size)
    adv = g - g.mean(axis=1, keepdims=True)
    if scale == "group":
        adv = adv / (g.std(axis=1, keepdims=True) + 1e-4)
    return adv.reshape(-1).tolist()


def lr_factor(update: int, kind: str, warmup: int, total: int) -> float:
    """Learning-rate multiplier of optimiser update `update` (0-based): (update + 1) / (warmup + 1) during warm-up,
    then 1 (constant), or decayed to 0 at `total` updates, linearly (1 - p) or on a half cosine (1 + cos(pi p)) / 2,
    p being the share of the post-warm-up updates already done."""
    if update < warmup:
        return (update + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    p = min(1.0, (update - warmup) / max(total - warmup, 1))
    return 1.0 - p if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))


# -- loss ----------------------------------------------------------------------------------------------------------------
def token_logps(model, batch: dict, temperature: float = 1.0):
    """Log-probabilities of each next token under `model` (logits divided by the sampling temperature) and the mask
    of the positions that are trained: both (B, L-1), aligned with labels[:, 1:]."""
    import torch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    # The softmax over the vocabulary only where a token is trained: observation tokens are most of an episode.
    trained = logits[mask].float() / temperature
    logps = torch.zeros(mask.shape, dtype=trained.dtype, device=trained.device)
    logps[mask] = torch.gather(trained.log_softmax(-1), -1, labels[mask].unsqueeze(-1)).squeeze(-1)
    return logps, mask


def policy_loss(logps, old_logps, advantages, mask, epsilon: float, epsilon_high: float, loss_type: str, norm: float):
    """The clipped GRPO surrogate, negated: -min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) per model token,
    rho = exp(logp - old logp), summed with `loss_type` weighting and divided by `norm`:

    - "dapo": every token weighs the same; norm = the number of trained tokens in the whole rollout batch.
    - "grpo": each sequence's tokens are averaged first; norm = the number of sequences in the batch.
    No KL term (beta = 0). advantages: (B,), one per sequence."""
    import torch

    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv)
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / norm
    return (per_token * mask).sum() / norm
