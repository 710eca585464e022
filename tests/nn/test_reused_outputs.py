"""Large eval outputs reuse the memory of dropped ones, and never of one still held."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading

import pytest
import torch

import vqdeploy
from vqdeploy.nn import reused_outputs

BIG = (reused_outputs.REUSED_MIN_BYTES // 4 // 64, 64)  # float32 rows of 64: exactly the threshold


@pytest.fixture(autouse=True)
def no_idle_blocks():
    reused_outputs.release()
    yield
    reused_outputs.release()


def test_a_dropped_output_gives_its_memory_to_the_next_one_of_its_size():
    first = reused_outputs.empty(BIG, torch.float32)
    address = first.data_ptr()
    assert address % reused_outputs.ALIGNMENT == 0
    del first
    assert reused_outputs.idle_bytes() == reused_outputs.REUSED_MIN_BYTES
    second = reused_outputs.empty(BIG, torch.float32)
    assert second.data_ptr() == address
    assert reused_outputs.idle_bytes() == 0


def test_memory_stays_with_an_output_while_any_view_of_it_lives():
    first = reused_outputs.empty(BIG, torch.float32)
    first.fill_(3.0)
    view = first[10:20]
    del first
    gc.collect()
    assert reused_outputs.idle_bytes() == 0
    second = reused_outputs.empty(BIG, torch.float32)
    second.fill_(-1.0)
    assert bool((view == 3.0).all())
    assert second.data_ptr() != view.data_ptr() - 10 * BIG[1] * 4
    del view
    assert reused_outputs.idle_bytes() == reused_outputs.REUSED_MIN_BYTES


def test_small_outputs_sizes_and_dtypes():
    small = reused_outputs.empty((100, 64), torch.float32)
    assert small.untyped_storage().resizable()  # torch's own allocation
    del small
    assert reused_outputs.idle_bytes() == 0
    half = reused_outputs.empty((BIG[0] * 2, BIG[1]), torch.bfloat16)  # the same bytes in another dtype
    assert half.dtype == torch.bfloat16 and half.shape == (BIG[0] * 2, BIG[1])
    address = half.data_ptr()
    del half
    other = reused_outputs.empty((BIG[0] + 1, BIG[1]), torch.float32)  # another size: a new block
    assert other.data_ptr() != address
    again = reused_outputs.empty(BIG, torch.float32)
    assert again.data_ptr() == address


def test_idle_blocks_are_bounded_and_release_frees_them():
    outputs = [reused_outputs.empty(BIG, torch.float32) for _ in range(12)]
    del outputs
    assert reused_outputs.idle_bytes() <= reused_outputs.IDLE_MAX_BYTES
    assert reused_outputs.idle_bytes() == reused_outputs.IDLE_MAX_BYTES // reused_outputs.REUSED_MIN_BYTES * (
        reused_outputs.REUSED_MIN_BYTES)
    reused_outputs.release()
    assert reused_outputs.idle_bytes() == 0


def test_a_new_size_is_reused_after_the_idle_blocks_filled_up_with_another():
    large = (BIG[0] * 4, BIG[1])  # four times the threshold
    held = [reused_outputs.empty(large, torch.float32) for _ in range(reused_outputs.IDLE_MAX_BYTES // (4 * BIG[0] * BIG[1] * 4))]
    del held
    assert reused_outputs.idle_bytes() == reused_outputs.IDLE_MAX_BYTES  # full of the large size
    first = reused_outputs.empty(BIG, torch.float32)
    address = first.data_ptr()
    del first  # the longest idle large block makes room
    assert reused_outputs.idle_bytes() <= reused_outputs.IDLE_MAX_BYTES
    assert reused_outputs.empty(BIG, torch.float32).data_ptr() == address


def test_the_environment_turns_reuse_off(monkeypatch):
    monkeypatch.setenv(reused_outputs.ENV_REUSE, "0")
    first = reused_outputs.empty(BIG, torch.float32)
    assert first.untyped_storage().resizable()
    del first
    assert reused_outputs.idle_bytes() == 0


def test_a_reused_output_behaves_as_a_tensor():
    out = reused_outputs.empty(BIG, torch.float32)
    out.copy_(torch.arange(out.numel(), dtype=torch.float32).view(BIG))
    assert out.is_contiguous() and not out.requires_grad
    shared = out.clone().share_memory_()
    assert torch.equal(shared, out)
    moved = out.share_memory_()  # its storage moves to shared memory: the block is free again
    assert moved.is_shared() and reused_outputs.idle_bytes() == reused_outputs.REUSED_MIN_BYTES
    assert torch.equal(out.view(-1)[:5], torch.arange(5, dtype=torch.float32))
    out.resize_(BIG)  # the same size is fine; a larger one raises, as for torch.from_numpy
    with pytest.raises(RuntimeError, match="not resizable"):
        out.resize_(BIG[0] + 1, BIG[1])


def _eager(n: int, d: int = 64, k: int = 256) -> vqdeploy.VectorQuantize:
    torch.manual_seed(0)
    return vqdeploy.VectorQuantize(dim=d, codebook_size=k).eval()


def test_eager_outputs_kept_by_the_caller_are_never_overwritten():
    n = BIG[0]
    vq = _eager(n)
    xs = [torch.randn(1, n, 64, generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    with torch.no_grad():
        kept = [vq(x) for x in xs]  # all four held: four blocks
        codes = vq._codebook.embed[0]
        for quantized, indices, _ in kept:
            assert not quantized.untyped_storage().resizable()  # it did come from reused memory
            assert torch.equal(quantized[0], codes[indices[0]])
        addresses = {q.data_ptr() for q, _, _ in kept}
        assert len(addresses) == 4
        del kept, quantized
        again = vq(xs[0])  # a dropped block is taken again, and written whole
        assert again[0].data_ptr() in addresses
        assert torch.equal(again[0][0], codes[again[1][0]])


def test_eager_forwards_in_threads_keep_their_own_outputs():
    n = BIG[0]
    vq = _eager(n)
    xs = [torch.randn(1, n, 64, generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    with torch.no_grad():
        expected = [vq._codebook.embed[0][vq(x)[1][0]] for x in xs]
    errors: list[str] = []

    def run(worker: int) -> None:
        with torch.no_grad():
            for round_ in range(3):
                x = xs[(worker + round_) % 4]
                quantized, _, _ = vq(x)
                if not torch.equal(quantized[0], expected[(worker + round_) % 4]):
                    errors.append(f"worker {worker} round {round_}")

    threads = [threading.Thread(target=run, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_reused_output_crosses_torch_multiprocessing(tmp_path):
    code = (
        "import torch, torch.multiprocessing as mp\n"
        "from vqdeploy.nn import reused_outputs\n"
        "def child(queue, received):\n"
        f"    out = reused_outputs.empty({BIG}, torch.float32)\n"
        "    out.fill_(7.0)\n"
        "    queue.put(out)\n"
        "    received.wait(120)  # the sender must live until the receiver has the shared memory\n"
        "if __name__ == '__main__':\n"
        "    context = mp.get_context('spawn')\n"
        "    queue = context.Queue()\n"
        "    received = context.Event()\n"
        "    process = context.Process(target=child, args=(queue, received))\n"
        "    process.start()\n"
        "    got = queue.get(timeout=120)\n"
        "    received.set()\n"
        "    process.join(120)\n"
        "    print(bool((got == 7.0).all()), tuple(got.shape))\n"
    )
    script = tmp_path / "child.py"  # spawn's child imports the script's functions
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", f"({BIG[0]},", f"{BIG[1]})"]
