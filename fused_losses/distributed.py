"""Helpers for multi-process (DDP/FSDP) training.

The losses are rank-local: under DDP each rank computes its loss on its own shard and DDP
averages the gradients. That is right for per-sample losses, but a normaliser taken over the
batch, such as a detection head's number of positive anchors (num_pos), must be the global one,
or each rank divides by a different count. mmdet averages it over ranks with reduce_mean:

    num_pos = reduce_mean((labels < C).sum().float()).clamp(min=1.0)   # a device tensor: no host sync
    loss = fl.sigmoid_focal(logits, labels, weight=label_weights, reduction="mean", avg_factor=num_pos)

With DDP's gradient averaging, every rank's gradient is then that of sum over all ranks /
sum of num_pos over all ranks, i.e. the single-process loss on the whole batch.

GHM-C's bin counts are the other batch-global statistic: ``ghmc(..., process_group=group)``
all-reduces them (global_bin_weights) so that every rank weights its samples by the histogram of
the global batch and every rank's EMA state stays identical.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["reduce_mean", "global_bin_weights"]


def reduce_mean(tensor: torch.Tensor, group: Optional["dist.ProcessGroup"] = None) -> torch.Tensor:
    """Mean of `tensor` over the ranks of `group` (default: the whole job), as mmdet's reduce_mean.

    When torch.distributed is initialised: a new tensor, the all-reduce SUM of tensor / world_size,
    identical on every rank (integer tensors become floating point, by true division). Otherwise
    `tensor` itself, unchanged. `tensor` is never written, and nothing waits on the host beyond
    the collective itself (NCCL runs it on the current stream). A statistic, not a loss: the
    result carries no gradient.

    Args:
        tensor: the rank's value, e.g. its number of positive anchors.
        group: a torch.distributed process group, or None for the default group.

    Returns:
        The mean over the ranks (a new tensor), or `tensor` itself without torch.distributed.

    Raises:
        TypeError: tensor is not a torch.Tensor.
        ValueError: this rank is not a member of `group`.

    Example:
        >>> import torch
        >>> from fused_losses.distributed import reduce_mean
        >>> labels = torch.tensor([0, 3, 3, 1])                       # C = 3: two positives
        >>> reduce_mean((labels < 3).sum().float()).clamp(min=1.0)    # no process group: unchanged
        tensor(2.)
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    world_size = dist.get_world_size(group)
    if world_size < 1:
        raise ValueError("group: this rank is not a member of the given process group")
    mean = tensor.detach() / world_size  # a new tensor: the caller's is never written
    dist.all_reduce(mean, op=dist.ReduceOp.SUM, group=group)
    return mean


def global_bin_weights(counts: torch.Tensor, state: Optional[torch.Tensor], momentum: float, dtype: torch.dtype,
                       group: Optional["dist.ProcessGroup"]) -> torch.Tensor:
    """GHM-C per-bin weights from the histogram of the global batch.

    counts (this rank's, from the ghmc_bin_counts op) are summed over the ranks of `group`
    (all_reduce on the device: no host sync), then the EMA `state` (when given) is updated in
    place and the weights n_valid / divisor_b / n_nonempty are returned (fused_losses.reference's
    formula, so a single process gives the same numbers as without a group). Every rank computes
    the same weights and the same new state.

    Args:
        counts: int64 (bins + 1,): valid entries per bin, then n_valid.
        state: None or the float32 (bins,) EMA state, updated in place.
        momentum: EMA momentum in [0, 1).
        dtype: dtype of the returned weights.
        group: a torch.distributed process group, or None for the default group.

    Returns:
        The (bins,) per-bin weights in `dtype`.

    Example:
        >>> import torch
        >>> from fused_losses.distributed import global_bin_weights
        >>> global_bin_weights(torch.tensor([3, 0, 1, 4]), None, 0.0, torch.float32, None)
        tensor([0.6667, 0.0000, 2.0000])
    """
    from fused_losses.reference import ghm_bin_weights  # noqa: PLC0415 - reference imports torch only

    counts = counts.clone()  # the op's output is ours, but never all-reduce a tensor in place twice
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    bins = counts.numel() - 1
    weights, new_state = ghm_bin_weights(counts[:bins].to(torch.float32), counts[bins], state, float(momentum), dtype)
    if state is not None:
        with torch.no_grad():
            state.copy_(new_state)
    return weights
