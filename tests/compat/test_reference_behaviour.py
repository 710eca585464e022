"""The behaviours vector-quantize-pytorch 1.32's own quantizer tests check, as this project's tests.

Those tests (53 items: the VectorQuantize / ResidualVQ / GroupedResidualVQ tests of its
`tests/test_readme.py`, `tests/test_beam.py` and `tests/test_manual_ema.py`) pass 46 of 53 with
the import changed to `vqdeploy.compat.vector_quantize_pytorch`; the other 7 use refused options
(beam search, `directional_reparam`). The tests here are written for this project from 1.32's
documented behaviour, at small sizes, and check each behaviour there: output shapes and layouts,
masks and lengths, index round trips, per-stage codebook sizes, frozen codebooks, manual,
weighted and accumulated EMA updates, top-k, the cross-entropy mode, the masked commitment loss,
the orthogonal regulariser with zero codes, grouped residual VQ, and the refused options' errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqdeploy.compat.vector_quantize_pytorch import GroupedResidualVQ, ResidualVQ, VectorQuantize
from vqdeploy.errors import UnsupportedOptionError

reference = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is a test dependency")

B, N, D, K = 2, 32, 16, 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _x(b: int = B, n: int = N, d: int = D, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(b, n, d).requires_grad_(requires_grad)


# -- VectorQuantize: outputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cosine_sim", [True, False])
@pytest.mark.parametrize("rotation_trick", [True, False])
@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_training_forward_shapes_and_gradient(use_cosine_sim, rotation_trick, input_requires_grad):
    vq = VectorQuantize(dim=D, codebook_size=K, decay=0.8, commitment_weight=1.0, use_cosine_sim=use_cosine_sim,
                        rotation_trick=rotation_trick).train()
    x = _x(requires_grad=input_requires_grad)
    quantized, indices, loss = vq(x)
    assert quantized.shape == x.shape and indices.shape == (B, N) and loss.shape == ()
    assert indices.dtype == torch.long and 0 <= int(indices.min()) and int(indices.max()) < K
    if input_requires_grad:
        (quantized.sum() + loss).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    else:
        assert not quantized.requires_grad


def test_eval_output_is_the_decoded_indices():
    vq = VectorQuantize(dim=D, codebook_size=K, decay=0.8).eval()
    quantized, indices, _ = vq(_x())
    torch.testing.assert_close(vq.get_output_from_indices(indices), quantized)


def test_lens_give_the_unpadded_forward_and_mark_padding():
    vq = VectorQuantize(dim=D, codebook_size=K, decay=1.0).train()  # decay 1: the two calls see one codebook
    x = _x(b=1, n=2 * N)
    quantized, indices, loss = vq(x[:, :N])
    padded_q, padded_i, padded_loss = vq(x, lens=torch.tensor([N]))
    torch.testing.assert_close(padded_loss, loss)
    torch.testing.assert_close(padded_q[:, :N], quantized)
    assert torch.equal(padded_i[:, :N], indices)
    assert bool((padded_q[:, N:] == 0).all()) and bool((padded_i[:, N:] == -1).all())


def test_padding_returns_the_input_when_asked():
    vq = VectorQuantize(dim=D, codebook_size=K, return_zeros_for_masked_padding=False).train()
    x = _x()
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[:, N // 2:] = False
    quantized, indices, _ = vq(x, mask=mask)
    torch.testing.assert_close(quantized[~mask], x[~mask])
    assert bool((indices[~mask] == -1).all()) and bool((indices[mask] >= 0).all())


def test_lower_codebook_dim_projects():
    vq = VectorQuantize(dim=D, codebook_size=K, codebook_dim=4).train()
    quantized, indices, _ = vq(_x())
    assert vq.codebook.shape == (K, 4) and quantized.shape == (B, N, D)
    with torch.no_grad():
        torch.testing.assert_close(vq.eval()(_x())[0].shape, torch.Size((B, N, D)))


def test_cosine_codebook_stays_on_the_unit_sphere():
    vq = VectorQuantize(dim=D, codebook_size=K, use_cosine_sim=True).train()
    vq(_x())
    torch.testing.assert_close(vq.codebook.norm(dim=-1), torch.ones(K), rtol=1e-5, atol=1e-5)


def test_dead_codes_are_replaced_by_batch_vectors():
    vq = VectorQuantize(dim=D, codebook_size=K, threshold_ema_dead_code=2, rotation_trick=False).train()
    x = _x(b=1, n=8)  # 8 vectors, 32 codes: every code's EMA count stays below 2
    before = vq.codebook.clone()
    _, indices, _ = vq(x)
    replaced = vq._codebook.cluster_size[0] == 2  # a replaced code restarts at the threshold
    untouched = ~replaced
    untouched[indices.unique()] = False
    assert bool(replaced.any()) and bool(untouched.any())
    distance = torch.cdist(vq.codebook, x[0]).min(dim=-1).values
    assert bool((distance[replaced] < 1e-2).all())  # a batch vector (after the EMA step's smoothing)
    torch.testing.assert_close(vq.codebook[untouched], before[untouched], rtol=0, atol=1e-6)


def test_multiheaded_image_feature_map():
    vq = VectorQuantize(dim=D, codebook_dim=4, heads=4, separate_codebook_per_head=True, codebook_size=K,
                        accept_image_fmap=True).train()
    fmap = torch.randn(1, D, 4, 4)
    quantized, indices, loss = vq(fmap)
    assert quantized.shape == fmap.shape and indices.shape == (1, 4, 4, 4) and loss.shape == ()
    vq.eval()
    quantized, indices, _ = vq(fmap)
    torch.testing.assert_close(vq.get_output_from_indices(indices), quantized)


# -- ResidualVQ / GroupedResidualVQ ------------------------------------------------------------------------
@pytest.mark.parametrize("implicit_neural_codebook, use_cosine_sim", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shared_codebook", [True, False])
def test_residual_output_is_the_decoded_indices(implicit_neural_codebook, use_cosine_sim, train, shared_codebook):
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16, implicit_neural_codebook=implicit_neural_codebook,
                     use_cosine_sim=use_cosine_sim, shared_codebook=shared_codebook).train(train)
    quantized, indices, losses = rvq(_x(d=8), freeze_codebook=train and not implicit_neural_codebook)
    assert indices.shape == (B, N, 4) and losses.shape == (4,)
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized, rtol=1e-5, atol=1e-5)


def test_freeze_codebook_leaves_every_stage_alone():
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16).train()
    before = [layer.codebook.clone() for layer in rvq.layers]
    rvq(_x(d=8), freeze_codebook=True)
    assert all(torch.equal(layer.codebook, b) for layer, b in zip(rvq.layers, before, strict=True))
    rvq(_x(d=8))
    assert not all(torch.equal(layer.codebook, b) for layer, b in zip(rvq.layers, before, strict=True))


def test_shared_codebook_with_sampled_codes():
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16, stochastic_sample_codes=True, sample_codebook_temp=0.1,
                     shared_codebook=True).train()
    quantized, indices, losses = rvq(_x(d=8))
    assert quantized.shape == (B, N, 8) and indices.shape == (B, N, 4) and losses.shape == (4,)
    assert all(layer.codebook.data_ptr() == rvq.layers[0].codebook.data_ptr() for layer in rvq.layers)


def test_kmeans_initialises_every_stage_on_the_first_batch():
    rvq = ResidualVQ(dim=8, codebook_size=16, num_quantizers=3, kmeans_init=True, kmeans_iters=3).train()
    assert not any(bool(layer._codebook.initted) for layer in rvq.layers)
    rvq(_x(d=8))
    assert all(bool(layer._codebook.initted) for layer in rvq.layers)
    rvq.eval()
    quantized, indices, _ = rvq(_x(d=8))
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized, rtol=1e-5, atol=1e-5)


def test_one_codebook_size_per_stage():
    rvq = ResidualVQ(dim=2, codebook_size=(5, 16, 32)).train()
    assert [layer.codebook.shape[0] for layer in rvq.layers] == [5, 16, 32]
    quantized, indices, _ = rvq(torch.randn(4, 64, 2), freeze_codebook=True)
    assert indices.shape == (4, 64, 3)
    assert all(int(indices[..., s].max()) < size for s, size in enumerate((5, 16, 32)))
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized, rtol=1e-5, atol=1e-5)


def test_grouped_residual_layouts_are_the_reference_ones():
    x = _x()
    ours = GroupedResidualVQ(dim=D, num_quantizers=3, groups=2, codebook_size=K)
    theirs = reference.GroupedResidualVQ(dim=D, num_quantizers=3, groups=2, codebook_size=K)
    for mode in ("train", "eval"):
        got, want = getattr(ours, mode)()(x), getattr(theirs, mode)()(x)
        assert [t.shape for t in got] == [t.shape for t in want] == [(B, N, D), (2, B, N, 3), (2, 3)]
    quantized, indices, _ = ours(x)
    torch.testing.assert_close(ours.get_output_from_indices(indices), quantized, rtol=1e-5, atol=1e-5)


# -- EMA updates: manual, weighted, accumulated --------------------------------------------------------------
def _twins(**kwargs):
    first = VectorQuantize(dim=D, codebook_size=K, **kwargs)
    second = VectorQuantize(dim=D, codebook_size=K, **kwargs)
    second.load_state_dict(first.state_dict())
    return first.train(), second.train()


def _same_ema_state(a, b) -> None:
    torch.testing.assert_close(a._codebook.cluster_size, b._codebook.cluster_size)
    torch.testing.assert_close(a._codebook.embed_avg, b._codebook.embed_avg)
    torch.testing.assert_close(a.codebook, b.codebook)


def test_manual_ema_update_equals_the_automatic_one():
    auto, manual = _twins()
    x, mask = _x(), torch.rand(B, N) > 0.5
    q1, i1, _ = auto(x, mask=mask)
    q2, i2, _ = manual(x, mask=mask, ema_update=False)
    torch.testing.assert_close(q1, q2)
    assert torch.equal(i1, i2)
    assert not torch.allclose(auto._codebook.embed_avg, manual._codebook.embed_avg)
    manual.update_ema_indices(x, i2, mask=mask)
    _same_ema_state(auto, manual)


@pytest.mark.parametrize("training", [True, False])
def test_top1_is_the_plain_forward_and_its_loss_per_token(training):
    plain, topk = _twins()
    plain.train(training), topk.train(training)
    x = _x()
    mask = torch.rand(B, N) > 0.5 if training else None
    q1, i1, loss1 = plain(x, mask=mask)
    q2, i2, losses = topk(x, mask=mask, topk=1, ema_update=False)
    assert q2.shape == (B, N, 1, D) and i2.shape == (B, N, 1) and losses.shape == (B, N, 1)
    assert torch.equal(i2[..., 0], i1)
    torch.testing.assert_close(q2[..., 0, :], q1)
    if training:
        torch.testing.assert_close(losses.sum() / mask.sum(), loss1)
        topk.update_ema_indices(x, i2[..., 0], mask=mask)
        _same_ema_state(plain, topk)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["single_token", "channel_first", "image"])
def test_topk_layouts(training, layout):
    kwargs = dict(channel_last=False) if layout == "channel_first" else {}
    kwargs = dict(accept_image_fmap=True) if layout == "image" else kwargs
    x = {"single_token": torch.randn(2, 8), "channel_first": torch.randn(2, 8, 4), "image": torch.randn(2, 8, 3, 3)}
    want = {"single_token": ((2, 2, 8), (2, 2)), "channel_first": ((2, 8, 4, 2), (2, 4, 2)),
            "image": ((2, 8, 3, 3, 2), (2, 3, 3, 2))}
    vq = VectorQuantize(dim=8, codebook_size=8, **kwargs).train(training)
    quantized, indices, loss = vq(x[layout], topk=2)
    assert (tuple(quantized.shape), tuple(indices.shape), tuple(loss.shape)) == (*want[layout], want[layout][1])


def test_topk_is_cast_and_clamped_to_the_codebook():
    vq = VectorQuantize(dim=8, codebook_size=8).eval()
    assert vq(torch.randn(2, 4, 8), topk=2.0)[1].shape == (2, 4, 2)
    _, indices, _ = vq(torch.randn(2, 4, 8), topk=9)
    assert indices.shape == (2, 4, 8) and torch.equal(indices.sort(dim=-1).values[0, 0], torch.arange(8))


@pytest.mark.parametrize("use_cosine_sim", [False, True])
@pytest.mark.parametrize("as_callable", [False, True])
def test_ema_update_weight_picks_the_codes_that_move(use_cosine_sim, as_callable):
    vq = VectorQuantize(dim=D, codebook_dim=8, codebook_size=8, decay=0.8, use_cosine_sim=use_cosine_sim).train()
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    before = vq.codebook.clone()
    x = torch.randn(8, 64, D)
    vq(x, ema_update_weight=(lambda sums, counts: weights) if as_callable else weights)
    moved = weights.bool()  # (the step re-derives every code from its EMA sums: 1.32 moves weight-0 codes by ~3e-6 here)
    torch.testing.assert_close(vq.codebook[~moved], before[~moved], rtol=0, atol=1e-5)
    assert bool((vq.codebook[moved] != before[moved]).all(dim=-1).all())


def test_accumulated_ema_updates_wait_for_the_next_plain_forward():
    vq = VectorQuantize(dim=D, codebook_dim=8, codebook_size=8, decay=0.8, use_cosine_sim=True).train()
    before = vq.codebook.clone()
    x = torch.randn(8, 64, D)
    vq(x, accum_ema_update=True)
    vq(x, accum_ema_update=True)
    torch.testing.assert_close(vq.codebook, before, rtol=0, atol=1e-6)
    vq(x)
    assert not torch.allclose(vq.codebook, before, atol=1e-6)


# -- the cross-entropy mode ------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [None, 2])
@pytest.mark.parametrize("transformed", [False, True])
def test_cross_entropy_mode_is_the_reference_one(topk, transformed):
    theirs = reference.VectorQuantize(dim=8, codebook_size=8).eval()
    ours = VectorQuantize.from_vector_quantize_pytorch(theirs).eval()
    x, codes = torch.randn(2, 4, 8), torch.randint(-1, 8, (2, 4))
    transform = (lambda embed: 1.5 * embed[:, None, None].expand(-1, 2, 4, -1, -1)) if transformed else None
    quantized, loss = ours(x, indices=codes, topk=topk, codebook_transform_fn=transform)
    want_q, want_loss = theirs(x, indices=codes, topk=topk, codebook_transform_fn=transform)
    assert quantized.shape == ((2, 4, 2, 8) if topk else (2, 4, 8)) == want_q.shape and loss.shape == ()
    torch.testing.assert_close(quantized, want_q)
    torch.testing.assert_close(loss, want_loss)
    # by hand: the cross entropy of the negative distances to the given codes (-1 ignored)
    codebook = ours.codebook * (1.5 if transformed else 1.0)
    logits = -torch.cdist(x.reshape(-1, 8), codebook)
    torch.testing.assert_close(loss, F.cross_entropy(logits, codes.reshape(-1), ignore_index=-1))


# -- masked commitment, orthogonal regulariser ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(codebook_dim=3), dict(heads=2, codebook_dim=3, separate_codebook_per_head=True),
                                    dict(heads=2, codebook_dim=2, use_cosine_sim=True), dict(channel_last=False)])
def test_masked_commitment_is_the_packed_batch_loss(kwargs):
    vq = VectorQuantize(dim=6, codebook_size=8, rotation_trick=False, commitment_weight=0.7, **kwargs).train()
    x = (3 * torch.randn(2, 4, 6)).requires_grad_()
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    channel_first = kwargs.get("channel_last") is False
    inputs = x.transpose(1, 2) if channel_first else x
    quantized, indices, loss = vq(inputs, mask=mask, freeze_codebook=True)
    packed = x[mask][None]
    packed_q, packed_i, packed_loss = vq(packed.transpose(1, 2) if channel_first else packed, freeze_codebook=True)
    if channel_first:
        quantized, packed_q = quantized.transpose(1, 2), packed_q.transpose(1, 2)
    torch.testing.assert_close(loss, packed_loss)
    torch.testing.assert_close(quantized[mask], packed_q[0])
    assert torch.equal(indices[mask], packed_i[0])
    assert bool((quantized[~mask] == 0).all()) and bool((indices[~mask] == -1).all())
    (grad,) = torch.autograd.grad(loss, x)
    assert bool((grad[~mask] == 0).all()) and grad[mask].abs().sum() > 0


@pytest.mark.parametrize("codes, want", [
    ([[1.0, 0.0], [0.0, 1.0]], 0.0),  # orthonormal: no penalty
    ([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], 1 / 3),  # zero codes: the Gram diagonal's error, never negative
    ([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], 1 / 9),
    ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], (4 * 0.5) / 9),  # cos 45 deg twice each way
])
def test_orthogonal_regulariser_with_zero_codes(codes, want):
    from vqdeploy.nn.losses import orthogonal_loss

    values = torch.tensor([codes], dtype=torch.float64, requires_grad=True)
    loss = orthogonal_loss(values)
    torch.testing.assert_close(loss, torch.tensor(want, dtype=torch.float64))
    normed = F.normalize(values, dim=-1, eps=1e-6)
    expected = (normed @ normed.transpose(-1, -2) - torch.eye(len(codes), dtype=torch.float64)).square().mean()
    torch.testing.assert_close(torch.autograd.grad(loss, values)[0], torch.autograd.grad(expected, values)[0])


def test_orthogonal_regulariser_matches_the_reference_for_non_zero_codes():
    from vector_quantize_pytorch.vector_quantize_pytorch import orthogonal_loss_fn

    from vqdeploy.nn.losses import orthogonal_loss

    codes = torch.randn(2, 16, 4, dtype=torch.float64)
    torch.testing.assert_close(orthogonal_loss(codes), orthogonal_loss_fn(codes))


def test_zero_learnable_codebook_costs_one_over_k():
    vq = VectorQuantize(dim=2, codebook_size=4, learnable_codebook=True, ema_update=False, commitment_weight=0,
                        orthogonal_reg_weight=1, orthogonal_reg_max_codes=None, threshold_ema_dead_code=0,
                        rotation_trick=False).train()
    with torch.no_grad():
        vq.codebook.zero_()
    _, _, loss = vq(torch.zeros(2, 3, 2))
    torch.testing.assert_close(loss, torch.tensor(1 / 4))


# -- refused options ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, name", [
    (lambda: VectorQuantize(dim=8, codebook_size=8, directional_reparam=True, threshold_ema_dead_code=2),
     "directional_reparam"),
    (lambda: ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, directional_reparam=True,
                        threshold_ema_dead_code=2), "directional_reparam"),
    (lambda: ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, diveq=True), "diveq"),
    (lambda: VectorQuantize(dim=8, codebook_size=8, vq_bridge=torch.nn.Identity()), "vq_bridge"),
    (lambda: VectorQuantize(dim=8, codebook_size=8, learnable_codebook=True, ema_update=False,
                            in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.1)),
     "in_place_codebook_optimizer"),
    (lambda: ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, beam_size=2), "beam_size"),
    (lambda: ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, eval_beam_size=3), "eval_beam_size"),
])
def test_refused_options_are_named(build, name):
    with pytest.raises(UnsupportedOptionError, match=name):
        build()


def test_beam_size_of_one_is_the_greedy_search():
    greedy = ResidualVQ(dim=8, num_quantizers=3, codebook_size=8).eval()
    beam1 = ResidualVQ(dim=8, num_quantizers=3, codebook_size=8, beam_size=1, eval_beam_size=1).eval()
    beam1.load_state_dict(greedy.state_dict())
    x = _x(d=8)
    assert torch.equal(beam1(x)[1], greedy(x)[1])
