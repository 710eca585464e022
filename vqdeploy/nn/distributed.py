"""Synced codebooks under torch.distributed: W ranks train as one process on the whole batch.

The codebook (`EMACodebook`) calls these helpers, so every container of codebooks (VectorQuantize,
its heads, ResidualVQ, a shared codebook) syncs the same way. What travels, per training forward:

- EMA statistics: one all-reduce (SUM) of ``[code sums | code counts]``, shape (H, K, D + 1), and
  the W row counts of the ranks, per codebook update. Sums, not means: the EMA then sees the counts of the whole batch, exactly what
  one process on ``torch.cat(shards)`` sees, and ``threshold_ema_dead_code`` stays a count of the
  global batch.
- k-means init (``sync_kmeans=True``): the initial means are rows of the global batch (one
  all-reduce of the ranks' row counts; rank 0 draws global row numbers with the generator one
  process would use, one broadcast of K numbers, then one all-reduce of the K x D rows, each added
  by the rank that holds it), and every Lloyd iteration all-reduces ``[sums | counts]``, K x (D + 1)
  in float64: k-means on the global batch, with
  traffic independent of the batch size. ``sync_kmeans=False``: k-means on rank 0's shard alone,
  its result broadcast (K x D, bounded; cheaper, not the global batch).
- Dead codes: rows of the global batch picked the same way (the rows of each rank travel with the
  EMA statistics; one broadcast of the picks, one all-reduce of the picked rows), so every rank
  writes the same rows.
- The first synced training forward of a module (and the first after `load_state_dict`) broadcasts
  rank 0's codebook state once, so ranks that were initialised with different seeds agree.
- ResidualVQ's quantize-dropout stop stage: drawn by rank 0, broadcast.

Never a collective in eval mode, under `torch.no_grad()` or in inference mode: a synced codebook
does not learn from such a forward (a collective there hangs when only some ranks run it, e.g. a
rank-0 logging pass). Decisions about which collective comes next depend only on state that is
already equal on every rank, so all ranks call the same collectives in the same order.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.distributed as dist

from vqdeploy.errors import ConfigError, ProcessGroupNotInitializedError


def check_sync_options(sync_codebook: object, sync_kmeans: object) -> None:
    """ConfigError unless sync_codebook is True, False or None and sync_kmeans a bool."""
    if sync_codebook is not None and not isinstance(sync_codebook, bool):
        raise ConfigError(f"sync_codebook must be True, False or None (auto), got {sync_codebook!r}")
    if not isinstance(sync_kmeans, bool):
        raise ConfigError(f"sync_kmeans must be True or False, got {sync_kmeans!r}")


def group_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def sync_active(sync_codebook: bool | None) -> bool:
    """Whether a codebook with this setting syncs now (asked at every training forward, never cached).

    None: when a default process group of more than one rank is initialised. True: the same, but
    a missing process group is an error rather than a silent single-process run. False: never.
    """
    if sync_codebook is False:
        return False
    if not group_initialized():
        if sync_codebook:
            raise ProcessGroupNotInitializedError(
                "sync_codebook=True needs an initialised torch.distributed process group, and none is: call "
                "torch.distributed.init_process_group() first (torchrun sets its environment), or pass "
                "sync_codebook=None to sync only when one exists"
            )
        return False
    return dist.get_world_size() > 1


def collectives_allowed() -> bool:
    """False under torch.no_grad() and in inference mode: no collective is ever issued there."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def syncs_now(sync_codebook: bool | None) -> bool:
    """A training forward with this setting runs collectives now (grad enabled, group of size > 1)."""
    return collectives_allowed() and sync_active(sync_codebook)


# -- collectives ---------------------------------------------------------------------------------
def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (every rank gets the same bits)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_rank0_(tensors: list[torch.Tensor]) -> None:
    """Overwrite `tensors` with rank 0's values, in one broadcast (float64 holds float32/bool exactly)."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    dist.broadcast(flat, src=0)
    start = 0
    for t in tensors:
        t.copy_(flat[start : start + t.numel()].view(t.shape))
        start += t.numel()


def drawn_by_rank0(draw: Callable[[], torch.Tensor], numel: int, device: torch.device) -> torch.Tensor:
    """Rank 0 calls `draw` (its random generator, as one process would), every rank gets its int64 result."""
    if dist.get_rank() == 0:
        values = draw().to(device=device, dtype=torch.int64).reshape(-1)
    else:
        values = torch.empty(numel, dtype=torch.int64, device=device)
    dist.broadcast(values, src=0)
    return values


def rank_row_counts(local_rows: int, device: torch.device) -> torch.Tensor:
    """(W,) int64: how many rows each rank holds (one all-reduce)."""
    counts = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    counts[dist.get_rank()] = local_rows
    return all_reduce_sum_(counts)


def exact_row_counts(sent: torch.Tensor, local_rows: int) -> torch.Tensor:
    """(W,) int64 row counts that travelled as floats with other statistics (exact below 2^24 in float32).

    Above that (every rank sees the same values, so every rank takes the same branch) one more
    all-reduce counts them in int64.
    """
    if float(sent.max()) < 2 / torch.finfo(sent.dtype).eps:  # every integer below is exact
        return sent.round().long()
    return rank_row_counts(local_rows, sent.device)


def global_rows(local: torch.Tensor, picks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows number `picks` of the global batch, on every rank (one all-reduce of len(picks) x D).

    The global batch is laid out segment by segment, each segment being the ranks' rows in rank
    order: the layout of `torch.cat(shards)` for one segment; of a ResidualVQ's stage inputs
    concatenated stage after stage, or of several heads end to end, for more. `local` (S * m_r, D)
    is this rank's part, its S segments end to end; `counts` (W,) holds m_r, the rows per segment
    of each rank.
    """
    rank = dist.get_rank()
    per_segment = int(counts.sum())
    offset, mine = int(counts[:rank].sum()), int(counts[rank])
    segment, within = picks // per_segment, picks % per_segment
    owned = (within >= offset) & (within < offset + mine)
    out = torch.zeros(picks.numel(), local.shape[-1], dtype=local.dtype, device=local.device)
    out[owned] = local[(segment * mine + within - offset)[owned]]
    return all_reduce_sum_(out)  # each row comes from one rank; the others add zeros


def randrange(start: int, stop: int, sync_codebook: bool | None, device: torch.device) -> int:
    """`random.randrange(start, stop)`, drawn by rank 0 for every rank when codebooks sync now.

    For per-forward choices that change which collectives run (quantize dropout's stop stage).
    """
    if syncs_now(sync_codebook):
        return int(drawn_by_rank0(lambda: torch.tensor([random.randrange(start, stop)]), 1, device))
    return random.randrange(start, stop)
