"""vqdeploy.buffers: large CPU outputs advised onto huge pages, ordinary tensors otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vqdeploy import VectorQuantize, buffers


def test_small_and_non_cpu_buffers_are_left_alone():
    assert not buffers.advise_huge_pages(torch.empty(16))
    assert not buffers.advise_huge_pages(torch.empty(0))
    assert not buffers.advise_huge_pages(torch.empty(100, device="meta"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_a_large_buffer_is_advised_and_behaves_as_any_tensor():
    out = buffers.empty((1024, 2048), torch.float32)
    assert buffers.advise_huge_pages(out)  # the system call succeeded on its pages
    out.fill_(3.0)
    assert out.shape == (1024, 2048) and out.dtype == torch.float32 and float(out.sum()) == 3.0 * out.numel()
    out.resize_(10)  # an ordinary torch allocation: resizable, unlike a tensor made from numpy
    assert out.numel() == 10


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's smaps")
def test_the_eager_gather_of_a_large_batch_is_advised_onto_huge_pages():
    """The advice is what vqdeploy controls (the mapping holding the output carries MADV_HUGEPAGE's
    "hg" flag); whether the kernel finds free 2 MiB pages for it depends on the system's memory."""
    vq = VectorQuantize(dim=32, codebook_size=64).eval()
    x = torch.randn(1, 131072, 32)
    with torch.no_grad():
        quantized, indices, _ = vq(x)
    assert torch.equal(quantized[0], vq._codebook.embed[0][indices[0]])  # the same codes as a plain gather
    size = quantized.numel() * quantized.element_size()
    middle = quantized.data_ptr() + size // 2  # the advice splits the mapping at the buffer's first whole page
    flags: list[str] = []
    with open("/proc/self/smaps") as smaps:  # the mapping that holds the output's middle
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(v, 16) for v in head.split("-"))
                inside = low <= middle < high
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
    assert "hg" in flags, flags
