"""Loss reweighting with a global denominator, and a chunked cross-entropy (InternVL 2.5 report,
arXiv 2412.05271: square averaging).

L = sum_i (w_i / sum_j w_j) * CE_i, with x = supervised tokens of the sample token i belongs to:
token w = 1, sample w = 1/x, square w = 1/sqrt(x) (InternVL 2.5 §3.4 uses square). The denominator sums
the weights of every micro-batch in the gradient-accumulation window and is averaged across data-parallel
ranks, so DDP's gradient mean gives exactly sum_all(w CE) / sum_all(w).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from train.attention import packed_hidden_states

IGNORE = -100
Averaging = Literal["token", "sample", "square"]


def shift_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """targets[t] = labels[t + 1], except at each piece's last token (its next token is another sample)."""
    targets = torch.full_like(labels, IGNORE)
    targets[:-1] = labels[1:]
    targets[(cu_seqlens[1:] - 1).long()] = IGNORE
    return targets


def token_weights(
    targets: torch.Tensor, cu_seqlens: torch.Tensor, averaging: Averaging = "square"
) -> torch.Tensor:
    """Per-token loss weight (0 where not supervised); x counted per piece (a piece is one sample)."""
    valid = (targets != IGNORE).to(torch.float32)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    piece = torch.repeat_interleave(torch.arange(lengths.numel(), device=targets.device), lengths)
    x = torch.zeros(lengths.numel(), device=targets.device).index_add_(0, piece, valid)[piece]
    if averaging == "token":
        w = torch.ones_like(x)
    elif averaging == "sample":
        w = 1.0 / x.clamp(min=1)
    elif averaging == "square":
        w = x.clamp(min=1).rsqrt()
    else:
        raise ValueError(f"unknown loss averaging {averaging!r}")
    return w * valid


def global_denominator(
    local_weight_sum: float | torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """sum of weights over this rank's accumulation window, averaged across ranks (InternVL's loss_weight_sum)."""
    total = torch.as_tensor(local_weight_sum, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total = total / dist.get_world_size()
    return total.to(torch.float32)


def _chunk_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # fp32 softmax on one chunk only
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (ce * w).sum()


def weighted_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """sum_i w_i CE_i over supervised tokens only, `chunk_size` rows of logits at a time.

    Unsupervised positions (prompts, image tokens) never reach the LM head; each chunk is recomputed in
    the backward pass, so at most chunk_size x vocab fp32 logits exist at once (151k vocab: ~1.2 GB)."""
    keep = weights > 0
    hidden, targets, weights = hidden[keep], targets[keep], weights[keep].to(torch.float32)
    total = hidden.new_zeros((), dtype=torch.float32)
    if hidden.shape[0] == 0:
        return total + hidden.sum() * 0.0 + lm_head_weight.sum() * 0.0  # keep the graph connected for DDP
    for a in range(0, hidden.shape[0], chunk_size):
        sl = slice(a, a + chunk_size)
        args = (hidden[sl], lm_head_weight, targets[sl], weights[sl])
        if torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad):
            total = total + checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss(*args)
    return total


class PackedLoss(torch.nn.Module):
    """Model + packed forward + weighted chunked CE as one module, so DDP/FSDP wrap the whole step.

    forward(batch) -> sum_i w_i CE_i of one flattened packed row (divide by `global_denominator`)."""

    def __init__(self, model: torch.nn.Module, chunk_size: int = 2048):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: dict, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        hidden = packed_hidden_states(self.model, batch)
        return weighted_cross_entropy(hidden, self.model.lm_head.weight, targets, weights, self.chunk_size)
