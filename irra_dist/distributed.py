"""Distributed helpers for the loss path: the only module there that talks to ``torch.distributed``.

Contrastive losses (SDM, ITC, CMPM) over the *global* batch score each rank's local rows against the
columns of every rank. :func:`gather_columns` builds those columns with :func:`all_gather_with_grad`, whose
backward sums the column gradients of all ranks into each rank's own rows. With the engine dividing each
rank's summed loss by ``global_count / world_size`` and DDP averaging parameter gradients, N ranks then
reproduce one process holding the whole batch (tests/test_distributed_losses.py checks this).

Every function is an identity (or a constant) when no process group is initialised or the world has
one process, so single-process code paths need no branches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

MIN_TORCH = (2, 13)
"""The oldest torch checked (here) to give the functional all-gather an autograd formula; install_requires
names it too."""


class TorchTooOldError(ValueError):
    """The installed torch's functional all-gather carries no gradient; the message says what to install."""


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def require_differentiable_gather() -> None:
    """Check that :func:`all_gather_with_grad` back-propagates across ranks with the installed torch.

    Older torch releases run the functional all-gather without an autograd formula: training would proceed
    while SDM/ITC silently lost the gradient of every other rank's columns. Checked by version and by asking
    the dispatcher whether the op has an autograd kernel.

    Raises:
        TorchTooOldError: torch older than :data:`MIN_TORCH` or without that kernel.
    """
    version = torch.__version__
    try:
        old = _version_tuple(version) < MIN_TORCH
    except ValueError:
        old = False  # an unusual local version string: let the kernel check decide
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "_c10d_functional::all_gather_into_tensor", "Autograd")
    if old or not has_kernel:
        floor = ".".join(map(str, MIN_TORCH))
        raise TorchTooOldError(f"torch {version} gathers features across processes without their gradient "
                               f"(the contrastive losses would silently lose it): install torch>={floor}")


class DistributedInputError(ValueError):
    """Tensors whose shapes do not fit the collective; the message names the problem and the fix."""


class GatheredColumns(TypedDict):
    """Global columns for the contrastive losses, in rank order."""

    image_feats: torch.Tensor
    """``[G, D]`` image features of all ranks (carries gradients back to every rank)."""
    text_feats: torch.Tensor
    """``[G, D]`` text features of all ranks (carries gradients back to every rank)."""
    pids: torch.Tensor
    """``[G]`` person ids of all ranks."""
    offset: int
    """Index of this rank's first row in the global columns (sum of the lower ranks' sizes)."""


def is_distributed() -> bool:
    """Whether a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Rank of this process in the default group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_sizes(num_rows: int, device: torch.device | str = "cpu") -> list[int]:
    """First-dimension size of every rank, in rank order.

    One tiny all-gather plus a host sync: call it once per step at most, and not at all when the sizes are
    known (e.g. ``[batch_size] * world_size()`` for full batches).

    Args:
        num_rows: This rank's size.
        device: Device the backend communicates on (``cuda`` for NCCL, ``cpu`` for gloo).

    Returns:
        ``world_size()`` sizes; ``[num_rows]`` when not distributed.
    """
    if not is_distributed():
        return [num_rows]
    local = torch.tensor([num_rows], dtype=torch.int64, device=device)
    return funcol.all_gather_single(local, 0, dist.group.WORLD).tolist()


def all_gather_with_grad(tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` over all ranks along dim 0, keeping the autograd graph.

    The backward pass sums the gradient of the gathered tensor over ranks and hands each rank the slice of
    its own rows, so a loss computed on every rank from the gathered tensor back-propagates into all inputs.
    Ranks may hold different numbers of rows (the last batch of an epoch): rows are padded to the largest
    size for the collective and the padding is removed afterwards.

    Args:
        tensor: This rank's rows ``[n, ...]``; the trailing shape and dtype must agree across ranks.
        sizes: Every rank's ``n`` if known (skips the size exchange and its host sync).

    Returns:
        ``[sum(sizes), ...]`` in rank order; ``tensor`` itself when not distributed.

    Raises:
        DistributedInputError: If ``sizes`` does not list this rank's ``n`` at its own position.
    """
    if not is_distributed():
        return tensor
    sizes = _resolve_sizes(tensor, sizes)
    longest = max(sizes)
    if longest == min(sizes):
        return funcol.wait_tensor(funcol.all_gather_single(tensor.contiguous(), 0, dist.group.WORLD))
    padding = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
    gathered = funcol.wait_tensor(
        funcol.all_gather_single(torch.cat([tensor, padding]), 0, dist.group.WORLD)
    )
    return torch.cat([gathered[r * longest: r * longest + n] for r, n in enumerate(sizes)])


def gather_columns(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    pids: torch.Tensor,
    sizes: Sequence[int] | None = None,
) -> GatheredColumns:
    """Gather the columns of the contrastive losses (``image_cols``, ``text_cols``, ``col_pids``).

    Image and text features travel in one collective (concatenated along the feature dim) and the ids in a
    second one without gradient; the size exchange, if any, happens once.

    Args:
        image_feats: Local image features ``[n, D]``.
        text_feats: Local text features ``[n, D]``, same dtype as ``image_feats``.
        pids: Local person ids ``[n]``.
        sizes: Every rank's ``n`` if known.

    Returns:
        The gathered columns and this rank's row offset in them (0 and the inputs when not distributed).

    Raises:
        DistributedInputError: On mismatched local shapes or dtypes, or wrong ``sizes``.
    """
    if image_feats.shape != text_feats.shape or image_feats.dtype != text_feats.dtype:
        raise DistributedInputError(
            f"image and text features must share shape and dtype, got {tuple(image_feats.shape)} "
            f"{image_feats.dtype} and {tuple(text_feats.shape)} {text_feats.dtype}: project both to one "
            "embedding and cast them alike"
        )
    if pids.shape != (image_feats.shape[0],):
        raise DistributedInputError(
            f"pids must be [{image_feats.shape[0]}] (one per feature row), got {tuple(pids.shape)}"
        )
    if not is_distributed():
        return GatheredColumns(image_feats=image_feats, text_feats=text_feats, pids=pids, offset=0)
    sizes = _resolve_sizes(image_feats, sizes)
    both = all_gather_with_grad(torch.cat([image_feats, text_feats], dim=1), sizes)
    image_cols, text_cols = both.split(image_feats.shape[1], dim=1)
    with torch.no_grad():
        col_pids = all_gather_with_grad(pids, sizes)
    return GatheredColumns(image_feats=image_cols, text_feats=text_cols, pids=col_pids,
                           offset=sum(sizes[: rank()]))


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks, without gradient (e.g. a global count of masked tokens).

    Args:
        tensor: Same shape on every rank.

    Returns:
        A new tensor holding the sum (a detached copy when not distributed); the input is left untouched.
    """
    total = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def _resolve_sizes(tensor: torch.Tensor, sizes: Sequence[int] | None) -> list[int]:
    """Every rank's first-dimension size, exchanged only when the caller does not know it."""
    if sizes is None:
        return gather_sizes(tensor.shape[0], tensor.device)
    sizes = list(sizes)
    if len(sizes) != world_size() or sizes[rank()] != tensor.shape[0]:
        raise DistributedInputError(
            f"sizes {sizes} do not fit rank {rank()} of {world_size()} holding {tensor.shape[0]} rows: "
            "pass one size per rank, or sizes=None to exchange them"
        )
    return sizes
