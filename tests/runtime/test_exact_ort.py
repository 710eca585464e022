"""ONNX Runtime through vqdeploy's runtime returns the exact argmin: the search body that flags
the rows its float32 margin cannot prove, and the Quantizer re-solving them through the exact
torch path. A raw InferenceSession on the same file keeps ArgMin's certified-tie tokens."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx, runtime
from vqdeploy.ops import certify
from vqdeploy.ops.contract import nearest_code_exact

DIM, K = 16, 64

LAYOUTS = {
    "vq": (lambda: VectorQuantize(dim=DIM, codebook_size=K), lambda rows: rows[None]),
    "channel_first": (lambda: VectorQuantize(dim=DIM, codebook_size=K, channel_last=False), lambda rows: rows.T[None]),
    "image": (lambda: VectorQuantize(dim=DIM, codebook_size=K, accept_image_fmap=True),
              lambda rows: rows.T.reshape(1, DIM, 1, -1)),
    "heads": (lambda: VectorQuantize(dim=DIM, codebook_size=K, codebook_dim=DIM // 2, heads=2), lambda rows: rows[None]),
    "separate": (lambda: VectorQuantize(dim=DIM, codebook_size=K, codebook_dim=DIM // 2, heads=2,
                                        separate_codebook_per_head=True), lambda rows: rows[None]),
    "rvq": (lambda: ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=K), lambda rows: rows[None]),
}


def _near_ties(module: torch.nn.Module, rows: int) -> torch.Tensor:
    """Midpoints of code pairs of the first search, tiled to DIM, plus random rows."""
    codebook = module.layers[0].codebook if isinstance(module, ResidualVQ) else module.codebook
    codebook = (codebook[0] if codebook.ndim == 3 else codebook).detach()
    codebook = codebook.repeat(1, DIM // codebook.shape[1])
    pairs = torch.randint(0, K, (rows, 2))
    mid = (codebook[pairs[:, 0]] + codebook[pairs[:, 1]]) / 2
    return torch.cat([mid, mid + 1e-7 * torch.randn_like(mid), torch.randn(rows // 4, DIM)])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exact_ort")
    out = {}
    for name, (build, layout) in LAYOUTS.items():
        torch.manual_seed(0)
        module = build().eval()
        out[name] = dict(module=module, layout=layout, **{
            part: export_onnx(module, folder / f"{name}_{part}.onnx", part=part) for part in ("encode", "quantize")
        })
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ort_tokens_and_vectors_equal_the_exact_eager_model(exports, name):
    case = exports[name]
    x = case["layout"](_near_ties(case["module"], 1500))
    with torch.no_grad():
        eager_vectors, eager_indices, _ = case["module"](x)
    with runtime.load(case["quantize"], backend="ort") as quantizer:
        assert quantizer.search_is_exact
        vectors, indices = quantizer.quantize(x)
    assert torch.equal(indices, eager_indices)
    assert torch.equal(vectors, eager_vectors)  # a residual stack's later stages re-solved too
    with runtime.load(case["encode"], backend="ort") as quantizer:
        assert torch.equal(quantizer.encode(x), eager_indices)


def test_vq_tokens_are_the_exact_argmin_and_batch_invariant(exports):
    case = exports["vq"]
    rows = _near_ties(case["module"], 2000)
    exact = nearest_code_exact(rows, case["module"].codebook.detach())
    with runtime.load(case["encode"], backend="ort") as quantizer:
        whole = quantizer.encode(rows[None])[0]
        assert torch.equal(whole, exact)
        for size in (1, 7, 333):
            parts = [quantizer.encode(rows[None, s : s + size])[0] for s in range(0, 700, size)]
            assert torch.equal(torch.cat(parts), exact[: sum(len(p) for p in parts)]), size
        order = torch.randperm(len(rows))
        assert torch.equal(quantizer.encode(rows[None, order])[0], exact[order])


def test_without_the_recheck_tokens_are_certified_ties_only(exports):
    case = exports["vq"]
    rows = _near_ties(case["module"], 2000)
    codebook = case["module"].codebook.detach()
    exact = nearest_code_exact(rows, codebook)
    with runtime.load(case["encode"], backend="ort", recheck=False) as quantizer:
        assert not quantizer.search_is_exact
        plain = quantizer.encode(rows[None])[0]
    assert bool((plain != exact).any())  # ArgMin alone flips some near ties ...
    assert bool(certify(rows, codebook, plain).certified.all())  # ... all certified


def test_the_file_itself_is_unchanged_for_a_raw_session(exports):
    """The re-check body is swapped in at load time: a plain InferenceSession runs the file's own
    ArgMin body (one output per graph output, certified-tie tokens)."""
    case = exports["vq"]
    session = ort.InferenceSession(str(case["encode"]), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["indices"]
    rows = _near_ties(case["module"], 500)
    (raw,) = session.run(None, {"x": rows[None].numpy()})
    assert bool(certify(rows, case["module"].codebook.detach(), torch.from_numpy(np.asarray(raw))[0]).certified.all())
