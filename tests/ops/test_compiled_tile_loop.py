"""The compiled tile loop of the CPU op: its SGEMM entries, code blocks, worker threads, and the
Python tile loops it falls back to; every route gives the exact argmin."""

from __future__ import annotations

import multiprocessing
import platform
import threading

import numpy as np
import pytest
import torch

from vqdeploy.ops import cpu_kernels, gemm, sgemm_entry
from vqdeploy.ops._running_argmin import LIST_CAPACITY
from vqdeploy.ops.contract import exact_nearest_listed, nearest_code_exact, squared_norms

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the numba kernel is not available")


def _near_ties(rows: int, dim: int, codes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(codes, dim, generator=generator)
    codebook[codes // 2] = codebook[0]  # a duplicate: exact ties, lowest index wins
    pairs = torch.randint(0, codes, (rows, 2), generator=generator)
    mid = 0.5 * (codebook[pairs[:, 0]] + codebook[pairs[:, 1]])
    x = torch.where(torch.rand(rows, 1, generator=generator) < 0.5, mid, torch.randn(rows, dim, generator=generator))
    return x, codebook


@pytest.mark.parametrize("library", gemm.LIBRARIES)
def test_each_sgemm_entry_computes_the_product(library):
    entry = sgemm_entry.entry(library)
    if entry is None:
        pytest.skip(f"{library}'s ILP64 sgemm is not exported here")
    generator = np.random.default_rng(1)
    codes = generator.standard_normal((70, 33)).astype(np.float32)
    tile = generator.standard_normal((41, 33)).astype(np.float32)
    out = np.full((70, 41), np.nan, dtype=np.float32)
    with sgemm_entry.mkl_threads_of_this_thread(1):
        sgemm_entry.call(entry.address, codes, tile, out, -2.0)
    expected = -2.0 * codes.astype(np.float64) @ tile.T.astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_the_fast_route_is_found_on_the_platform_ci_runs():
    """torch's x86-64 Linux wheels export MKL's ILP64 sgemm: the compiled loop must be in use there."""
    if platform.machine() != "x86_64" or not torch.backends.mkl.is_available():
        pytest.skip("not an x86-64 torch with MKL")
    assert cpu_kernels.compiled_tile_entry("torch") is not None


def test_an_unknown_library_is_refused():
    with pytest.raises(ValueError, match="no sgemm entry"):
        sgemm_entry.entry("blis")


@pytest.fixture(params=["compiled", "python"])
def route(request, monkeypatch):
    if request.param == "python":  # as where no sgemm entry is found
        monkeypatch.setattr(cpu_kernels, "compiled_tile_entry", lambda library: None)
    elif cpu_kernels.compiled_tile_entry("torch") is None and cpu_kernels.compiled_tile_entry("numpy") is None:
        pytest.skip("no sgemm entry here")
    return request.param


@pytest.mark.parametrize("library", gemm.LIBRARIES)
@pytest.mark.parametrize("rows, dim, codes", [(1, 1, 1), (9, 3, 2), (5003, 32, 256), (3000, 64, 4096), (700, 512, 1027)])
def test_every_route_returns_the_exact_argmin(route, library, rows, dim, codes):
    x, codebook = _near_ties(rows, dim, codes)
    exact = nearest_code_exact(x, codebook)
    assert torch.equal(cpu_kernels.nearest_code_cpu(x, codebook, gemm=library), exact)
    for variant in (x.t().contiguous().t(), -x, x.double()):  # staged copies: strided, negative view, float64
        assert torch.equal(cpu_kernels.nearest_code_cpu(variant, codebook, gemm=library),
                           nearest_code_exact(variant, codebook))


@pytest.mark.parametrize("library", gemm.LIBRARIES)
@pytest.mark.parametrize("tile_rows, block_codes", [(37, 12), (512, 4), (1, 1027), (64, 1000)])
def test_code_blocks_and_tile_heights_change_no_token(monkeypatch, library, tile_rows, block_codes):
    """Blocks of codes fold into the running best in order (ragged last block, 4-code groups split
    across blocks, duplicates in different blocks): the lowest index still wins every tie."""
    x, codebook = _near_ties(3001, 24, 1027, seed=3)
    exact = nearest_code_exact(x, codebook)
    monkeypatch.setattr(cpu_kernels, "PER_CORE_TILE_ROWS", tile_rows)
    monkeypatch.setattr(cpu_kernels, "CODE_BLOCK_BYTES", 4 * tile_rows * block_codes)
    assert torch.equal(cpu_kernels.nearest_code_cpu(x, codebook, gemm=library), exact)


def test_staged_copies_span_several_chunks(monkeypatch):
    x, codebook = _near_ties(4099, 16, 300, seed=5)
    monkeypatch.setattr(cpu_kernels, "STAGING_BYTES", 4 * 16 * 700)  # 700-row chunks, smaller than workers' tiles
    monkeypatch.setattr(cpu_kernels, "PER_CORE_TILE_ROWS", 300)
    for variant in (x.double(), x.t().contiguous().t()):
        assert torch.equal(cpu_kernels.nearest_code_cpu(variant, codebook), nearest_code_exact(variant, codebook))


def test_concurrent_calls_share_the_helpers():
    cases = [_near_ties(2000 + 97 * i, 32, 256, seed=10 + i) for i in range(6)]
    results: list[torch.Tensor | None] = [None] * len(cases)

    def run(i: int) -> None:
        for _ in range(3):
            results[i] = cpu_kernels.nearest_code_cpu(*cases[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (x, codebook), result in zip(cases, results, strict=True):
        assert result is not None and torch.equal(result, nearest_code_exact(x, codebook))


# Rows that sit on their codes, so none goes to the exact re-solve: its torch ops run parallel
# regions, and torch's own parallel regions (GNU OpenMP) hang in a forked child whose parent used
# them, whatever vqdeploy does. The op's workers are its own threads.
_FORK_CODES = torch.randn(256, 32, generator=torch.Generator().manual_seed(8))
_FORK_INDICES = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(7))
_FORK_CASE = (_FORK_CODES[_FORK_INDICES].contiguous(), _FORK_CODES)


def _child(queue) -> None:
    names: list[str] = []
    cpu_kernels._WORKERS.run(lambda index: names.append(threading.current_thread().name), 2)
    queue.put((sorted(names), cpu_kernels.nearest_code_cpu(*_FORK_CASE).numpy()))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_starts_its_own_helpers():
    x, codebook = _FORK_CASE
    cpu_kernels.nearest_code_cpu(x, codebook)  # the parent's helpers exist now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue,))
    child.start()
    try:
        names, tokens = queue.get(timeout=120)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert names == ["MainThread", "vqdeploy-nearest-code"]  # a helper of the child's own ran a piece
    assert torch.equal(torch.from_numpy(tokens), _FORK_INDICES)


def test_torch_one_thread_here_is_this_threads_alone():
    before = torch.get_num_threads()
    seen: list[int] = []
    with sgemm_entry.torch_one_thread_here():
        inside = torch.get_num_threads()
        other = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        other.start()
        other.join()
        torch.ones(4096, 64).sum()  # torch still runs in the block
    assert torch.get_num_threads() == before
    if sgemm_entry._torch_openmp() is not None and before > 1:
        assert inside == 1
    assert seen and seen[0] != 1 or before == 1  # another thread keeps its own count


def _search(x: torch.Tensor, codebook: torch.Tensor, library: str | None = None):
    """The compiled search alone, before any re-solve: (tokens, flags, listed rows, their lists)."""
    library = library or gemm.gemm_choice().library
    entry = cpu_kernels.compiled_tile_entry(library)
    if entry is None:
        pytest.skip(f"no compiled tile loop for {library} here")
    codes = codebook.float().contiguous()
    terms = cpu_kernels._CodebookTerms(codes)
    recheck = cpu_kernels._Recheck(terms, x.shape[0])
    listed = cpu_kernels._Listed()
    out = np.full(x.shape[0], -1, dtype=np.int64)
    cpu_kernels._search_compiled(x, codes, terms.norms.numpy(), out, recheck, cpu_kernels._thread_count(), None,
                                 entry, listed)
    rows, lists = listed.collect()
    return out, recheck.flags.copy(), rows, lists


def _integer_ties(seed: int = 0):
    """Integer-valued rows and codes (every float32 score exact in any summation order): exact
    midpoints of two codes (exact ties float64 cannot break), duplicated codes, and rows on codes."""
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randint(-8, 9, (200, 24), generator=generator).float() * 2  # even: midpoints are integers
    codebook[150] = codebook[3]  # a duplicate in another block
    pairs = torch.tensor([[3, 150], [5, 190], [0, 199], [17, 18], [40, 120]])
    x = torch.cat([(codebook[pairs[:, 0]] + codebook[pairs[:, 1]]) / 2, codebook[[3, 7, 150, 199]]])
    return x, codebook, pairs


def test_rows_float64_cannot_separate_are_listed_with_every_tied_code(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "CODE_BLOCK_BYTES", 4 * 16 * 8)  # 16-code blocks: ties span blocks
    monkeypatch.setattr(cpu_kernels, "PER_CORE_TILE_ROWS", 8)
    x, codebook, pairs = _integer_ties()
    out, flags, rows, lists = _search(x, codebook)
    scores = squared_norms(codebook)[None, :].double() - 2.0 * x.double() @ codebook.double().t()
    tied = {r: torch.nonzero(scores[r] == scores[r].min()).squeeze(1).tolist() for r in range(x.shape[0])}
    listed = {int(r): [int(k) for k in codes if k >= 0] for r, codes in zip(rows, lists, strict=True)}
    for r in range(x.shape[0]):
        if len(tied[r]) > 1:
            assert flags[r] == 2 and set(tied[r]) <= set(listed[r]), (r, tied[r], listed.get(r))
            assert listed[r] == sorted(listed[r])
        else:
            assert flags[r] == 0 and out[r] == tied[r][0]
    assert torch.equal(cpu_kernels.nearest_code_cpu(x, codebook), nearest_code_exact(x, codebook))
    assert cpu_kernels.nearest_code_cpu(x[:5], codebook).tolist() == pairs.min(dim=1).values.tolist()


def test_more_tied_codes_than_a_list_holds_go_to_the_full_search():
    codebook = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    codebook[10 : 10 + LIST_CAPACITY + 3] = codebook[9]  # LIST_CAPACITY + 4 copies of one code
    x = torch.cat([codebook[9:10], codebook[40:41]])
    out, flags, rows, lists = _search(x, codebook)
    assert flags.tolist() == [1, 0] and rows.numel() == 0
    assert cpu_kernels.nearest_code_cpu(x, codebook).tolist() == [9, 40]


@pytest.mark.parametrize("block_codes", [8, 16, 64])
def test_a_near_best_found_in_a_later_block_keeps_the_earlier_one_listed(monkeypatch, block_codes):
    """Rows between a code of the first block and one of a later block, a hair nearer the later one:
    the running best changes in the later block while the earlier best stays within the bound, so
    the candidate list must carry it over; every such row is decided exactly or listed, none falls
    back to the full search, and every token is the exact argmin."""
    monkeypatch.setattr(cpu_kernels, "CODE_BLOCK_BYTES", 4 * 64 * block_codes)
    monkeypatch.setattr(cpu_kernels, "PER_CORE_TILE_ROWS", 64)
    generator = torch.Generator().manual_seed(block_codes)
    codebook = torch.randn(256, 64, generator=generator)
    early = torch.randint(0, 8, (500,), generator=generator)
    late = torch.randint(128, 256, (500,), generator=generator)
    nudge = torch.rand(500, 1, generator=generator) * 2e-6
    x = (0.5 - nudge) * codebook[early] + (0.5 + nudge) * codebook[late]
    out, flags, rows, lists = _search(x, codebook)
    assert (flags != 1).all()
    assert torch.equal(cpu_kernels.nearest_code_cpu(x, codebook), nearest_code_exact(x, codebook))


def test_exact_nearest_listed_decides_separable_rows_and_breaks_exact_ties_low():
    x, codebook, pairs = _integer_ties(seed=4)
    candidates = torch.full((x.shape[0], 4), -1, dtype=torch.int64)
    for r in range(x.shape[0]):
        best = nearest_code_exact(x[r : r + 1], codebook).item()
        tied = sorted({best, *pairs[r].tolist()}) if r < pairs.shape[0] else [best]
        extra = [k for k in (0, 1, 2) if k not in tied][: 4 - len(tied)]
        candidates[r, : len(tied) + len(extra)] = torch.tensor(sorted(tied + extra))
    assert torch.equal(exact_nearest_listed(x, codebook, candidates), nearest_code_exact(x, codebook))


def test_a_codebook_changed_in_place_is_searched_with_its_new_norms():
    """The codebook's norms and bounds are kept between calls for small codebooks; a change to the
    same storage that bumps no version counter (through .data, or a numpy view) must still be seen."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(400, 16, generator=generator)
    weight = torch.nn.Parameter(torch.randn(64, 16, generator=generator))
    codebook = weight.detach()
    before = cpu_kernels.nearest_code_cpu(x, codebook)
    assert torch.equal(before, nearest_code_exact(x, codebook))
    version = codebook._version
    weight.data.mul_(torch.linspace(0.2, 3.0, 64)[:, None])  # an EMA-style update through .data
    assert codebook._version == version
    after = cpu_kernels.nearest_code_cpu(x, codebook)
    assert torch.equal(after, nearest_code_exact(x, codebook)) and not torch.equal(after, before)
    codebook.numpy()[::2] *= -1.0  # the same storage again, through numpy
    assert torch.equal(cpu_kernels.nearest_code_cpu(x, codebook), nearest_code_exact(x, codebook))
