"""Synced codebooks under torch.distributed (gloo on 127.0.0.1, CPU): W ranks train as one process.

One spawn of WORLD processes runs every config of CONFIGS; each rank records its buffers and
indices after every step into a file, and the test compares them here: bitwise equal across ranks,
and equal to one process trained on ``torch.cat(shards)`` (indices exactly, buffers within 1e-5).
Each rank seeds its generators differently, so the ranks only agree if the module syncs them.
"""

from __future__ import annotations

import os
import random
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vqdeploy import ResidualVQ, VectorQuantize

WORLD = 2
STEPS = 4
SEED = 1234
DIM = 16
DEADLINE_S = 300  # the whole spawn; a hung collective raises after the group timeout (60 s)
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "scatter", "gather", "barrier", "all_to_all", "all_to_all_single", "send", "recv")


@dataclass(frozen=True)
class Config:
    kind: str  # "vq" or "rvq"
    kwargs: dict = field(default_factory=dict)
    shard_batches: tuple[int, ...] = (3, 2)  # batch items per rank: unequal, so means would be wrong
    seq: int = 24
    compare_to_one_process: bool = True
    ddp: bool = False  # wrap in DistributedDataParallel and take SGD steps (the module has parameters)
    expect_dead_codes: bool = False
    all_reduces_per_step: int | None = None  # after the first step, when nothing else happens


CONFIGS = {
    "vq_plain": Config("vq", dict(codebook_size=32), all_reduces_per_step=1),
    "vq_kmeans_dead_codes": Config(
        "vq", dict(codebook_size=64, kmeans_init=True, kmeans_iters=4, threshold_ema_dead_code=2.0), expect_dead_codes=True
    ),
    "vq_heads_separate": Config(
        "vq", dict(codebook_size=64, heads=4, codebook_dim=4, separate_codebook_per_head=True, kmeans_init=True,
                   threshold_ema_dead_code=1.5, use_cosine_sim=True), expect_dead_codes=True,
    ),
    "vq_heads_shared": Config("vq", dict(codebook_size=32, heads=2, codebook_dim=8), all_reduces_per_step=1),
    "vq_heads_separate_plain": Config(  # one all-reduce carries the statistics of every head
        "vq", dict(codebook_size=16, heads=4, codebook_dim=4, separate_codebook_per_head=True), all_reduces_per_step=1
    ),
    "vq_kmeans_rank0": Config(
        "vq", dict(codebook_size=32, kmeans_init=True, sync_kmeans=False), compare_to_one_process=False
    ),
    "rvq": Config(
        "rvq", dict(num_quantizers=3, codebook_size=32, kmeans_init=True, threshold_ema_dead_code=1.0),
        expect_dead_codes=True,
    ),
    "rvq_plain": Config("rvq", dict(num_quantizers=3, codebook_size=32), all_reduces_per_step=3),
    "rvq_shared_codebook": Config(
        "rvq", dict(num_quantizers=3, codebook_size=32, shared_codebook=True, kmeans_init=True,
                    threshold_ema_dead_code=1.5), expect_dead_codes=True,
    ),
    "rvq_dropout": Config(
        "rvq", dict(num_quantizers=4, codebook_size=16, quantize_dropout=True, threshold_ema_dead_code=1.0), seq=12
    ),
    "rvq_ddp": Config(
        "rvq", dict(num_quantizers=2, codebook_size=32, codebook_dim=8, kmeans_init=True), shard_batches=(2, 2), ddp=True
    ),
}


def build(config: Config, **overrides) -> nn.Module:
    kwargs = {**config.kwargs, **overrides}
    if config.kind == "vq":
        return VectorQuantize(dim=DIM, **kwargs)
    return ResidualVQ(dim=DIM, **kwargs)


def global_batch(config: Config, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(sum(config.shard_batches), config.seq, DIM, generator=generator) * 2


def shard(config: Config, x: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(config.shard_batches[:rank])
    return x[start : start + config.shard_batches[rank]]


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def task_loss(x: torch.Tensor, quantized: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    return (quantized - x).pow(2).mean() + losses.sum()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    states = {f"buffer:{k}": v.detach().clone() for k, v in module.named_buffers()}
    states.update({f"param:{k}": v.detach().clone() for k, v in module.named_parameters()})
    return states


# -- the child processes ----------------------------------------------------------------------------
class CollectiveCounter:
    """Wraps the collectives of torch.distributed and counts the calls (each call goes through)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._counting(name, original))

    def _counting(self, name, original):
        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return original(*args, **kwargs)

        return counted

    def reset(self) -> None:
        self.calls = {}

    def total(self) -> int:
        return sum(self.calls.values())


def _run_config(name: str, config: Config, rank: int, counter: CollectiveCounter) -> dict:
    seed_all(SEED + 1000 * rank)  # different on every rank: only the sync can make the ranks agree
    module = build(config).train()
    # DDP's defaults: it broadcasts rank 0's buffers before each forward, already equal here
    model = nn.parallel.DistributedDataParallel(module) if config.ddp else module
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1) if config.ddp else None
    record = {"states": [], "indices": [], "all_reduces": []}
    for step in range(STEPS):
        x = shard(config, global_batch(config, step), rank)
        counter.reset()
        quantized, indices, losses = model(x)
        if optimizer is not None:
            optimizer.zero_grad()
            task_loss(x, quantized, losses).backward()
            optimizer.step()
        record["all_reduces"].append(counter.calls.get("all_reduce", 0))
        record["states"].append(snapshot(module))
        record["indices"].append(indices.clone())

    # No collective in eval, under no_grad or inference mode; rank 0 alone runs them, so one would hang.
    x = shard(config, global_batch(config, STEPS), rank)
    before = snapshot(module)
    counter.reset()
    if rank == 0:
        module.eval()
        module(x)
        with torch.no_grad():
            module(x)
        with torch.inference_mode():
            module(x)
        module.train()
        with torch.no_grad():
            module(x)  # a training-mode forward without grad: the synced codebook does not learn
        with torch.inference_mode():
            module(x)
    record["collectives_in_eval"] = counter.total()
    record["unchanged_without_grad"] = all(torch.equal(before[k], v) for k, v in snapshot(module).items())
    dist.barrier()  # both ranks reach here only if rank 0 issued no collective above

    counter.reset()
    module.train()(x)  # the counter does see the collectives of a training forward
    record["collectives_in_training"] = counter.total()
    return record


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        counter = CollectiveCounter()
        records = {name: _run_config(name, config, rank, counter) for name, config in CONFIGS.items()}
        torch.save(records, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # leave together: tearing gloo down while a peer still works can abort at exit
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the test -------------------------------------------------------------------------------------
def one_process(config: Config) -> dict:
    """The same training on the whole batch, seeded as rank 0, without any process group."""
    seed_all(SEED)
    module = build(config, sync_codebook=False).train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1) if config.ddp else None
    record = {"states": [], "indices": []}
    for step in range(STEPS):
        x = global_batch(config, step)
        quantized, indices, losses = module(x)
        if optimizer is not None:
            optimizer.zero_grad()
            task_loss(x, quantized, losses).backward()
            optimizer.step()
        record["states"].append(snapshot(module))
        record["indices"].append(indices.clone())
    return record


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} gloo processes did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_buffer_is_bitwise_equal_across_ranks_after_every_step(ranks, name):
    first = ranks[0][name]
    for other in ranks[1:]:
        for step, (mine, theirs) in enumerate(zip(first["states"], other[name]["states"], strict=True)):
            unequal = [key for key in mine if not torch.equal(mine[key], theirs[key])]
            assert not unequal, f"{name} step {step}: ranks differ in {unequal}"


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, config in CONFIGS.items() if config.compare_to_one_process])
def test_ranks_train_as_one_process_on_the_whole_batch(ranks, name):
    config = CONFIGS[name]
    reference = one_process(config)
    batch_axis = 0 if config.kind == "vq" else 1  # ResidualVQ indices are (quantizer, batch, seq)
    for step in range(STEPS):
        indices = torch.cat([ranks[r][name]["indices"][step] for r in range(WORLD)], dim=batch_axis)
        assert torch.equal(indices, reference["indices"][step]), f"{name} step {step}: indices differ"
        states = ranks[0][name]["states"][step]
        for key, expected in reference["states"][step].items():
            torch.testing.assert_close(states[key], expected, atol=1e-5, rtol=1e-5, msg=f"{name} step {step} {key}")
    if config.expect_dead_codes:  # the config does exercise dead-code replacement
        threshold = config.kwargs["threshold_ema_dead_code"]
        assert any(
            (state[key] == threshold).any() for state in reference["states"] for key in state if key.endswith("cluster_size")
        )
    if config.kwargs.get("quantize_dropout"):  # and quantize dropout stops at different stages
        assert len({int((i == -1).sum()) for i in reference["indices"]}) > 1


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, config in CONFIGS.items() if config.all_reduces_per_step])
def test_one_fused_all_reduce_per_codebook_and_step(ranks, name):
    expected = CONFIGS[name].all_reduces_per_step
    for rank in ranks:
        assert rank[name]["all_reduces"][1:] == [expected] * (STEPS - 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_collective_in_eval_no_grad_or_inference_mode(ranks, name):
    record = ranks[0][name]
    assert record["collectives_in_eval"] == 0
    assert record["unchanged_without_grad"]
    assert record["collectives_in_training"] > 0  # the counter sees what a training forward issues


# -- one process, no process group -------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(sync_codebook="yes"), dict(sync_codebook=1), dict(sync_kmeans=None)])
def test_sync_options_are_checked(kwargs):
    from vqdeploy.errors import ConfigError

    with pytest.raises(ConfigError, match="sync_"):
        VectorQuantize(dim=8, codebook_size=16, **kwargs)
    with pytest.raises(ConfigError, match="sync_"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, **kwargs)


def test_sync_codebook_true_needs_a_process_group_to_train_but_not_to_run():
    from vqdeploy.errors import ProcessGroupNotInitializedError

    assert not dist.is_initialized()
    vq = VectorQuantize(dim=8, codebook_size=16, sync_codebook=True)
    x = torch.randn(2, 5, 8)
    vq.eval()(x)  # eval never looks at torch.distributed
    with pytest.raises(ProcessGroupNotInitializedError, match="init_process_group"):
        vq.train()(x)
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, sync_codebook=True, quantize_dropout=True)
    with pytest.raises(ProcessGroupNotInitializedError):
        rvq.train()(x)


def test_automatic_sync_is_off_without_a_process_group_and_training_is_unchanged():
    torch.manual_seed(0)
    auto = VectorQuantize(dim=8, codebook_size=16, kmeans_init=True, threshold_ema_dead_code=2)
    torch.manual_seed(0)
    off = VectorQuantize(dim=8, codebook_size=16, kmeans_init=True, threshold_ema_dead_code=2, sync_codebook=False)
    for step in range(3):
        x = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(step))
        torch.manual_seed(step)
        a = auto.train()(x)[1]
        torch.manual_seed(step)
        assert torch.equal(a, off.train()(x)[1])
    for (name, mine), (_, theirs) in zip(auto.named_buffers(), off.named_buffers(), strict=True):
        assert torch.equal(mine, theirs), name


def test_loading_a_state_dict_broadcasts_rank0_state_again():
    vq = VectorQuantize(dim=8, codebook_size=16)
    vq._codebook.states_broadcast = True  # as after a first synced step
    vq.load_state_dict(VectorQuantize(dim=8, codebook_size=16).state_dict())
    assert not vq._codebook.states_broadcast
