"""The training features of vector-quantize-pytorch 1.32, from their documented behaviour.

Each test states what the option promises (padded positions do not count, top-k's first code is
the nearest, a manual EMA update equals the automatic one, ...) and checks it on vqdeploy's own
modules; tests/nn/test_reference_parity.py checks the same options step for step against 1.32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vqdeploy
from vqdeploy.compat import vector_quantize_pytorch as compat
from vqdeploy.errors import ConfigError, InputDtypeError, InputShapeError, UnsupportedOptionError
from vqdeploy.nn.losses import orthogonal_loss

TOL = dict(rtol=1e-5, atol=1e-5)


def _batch(digits: torch.Tensor, b: int = 4, n: int = 32) -> torch.Tensor:
    return digits[: b * n].reshape(b, n, 64).clone()


def _state(vq) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vq._codebook.state_dict().items()}


# -- padded batches ----------------------------------------------------------------------------------------
def test_padded_positions_neither_update_the_codebook_nor_count_in_the_loss(digits):
    x = _batch(digits)
    lens = torch.tensor([32, 20, 5, 1])
    mask = torch.arange(32)[None] < lens[:, None]
    padded_vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16, threshold_ema_dead_code=0).train()
    packed_vq = copy.deepcopy(padded_vq)
    q, idx, loss = padded_vq(x, lens=lens)
    pq, pidx, ploss = packed_vq(x[mask][None])
    torch.testing.assert_close(loss, ploss, **TOL)
    assert torch.equal(idx[mask], pidx[0]) and bool((idx[~mask] == -1).all())
    torch.testing.assert_close(q[mask], pq[0], **TOL)
    assert bool((q[~mask] == 0).all())
    for name, value in _state(padded_vq).items():
        torch.testing.assert_close(value, _state(packed_vq)[name], **TOL, msg=name)


def test_masked_padding_can_return_the_input(digits):
    x = _batch(digits)
    mask = torch.ones(4, 32, dtype=torch.bool)
    mask[:, 16:] = False
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16, return_zeros_for_masked_padding=False).eval()
    q, idx, _ = vq(x, mask=mask)
    assert torch.equal(q[~mask], x[~mask]) and bool((idx[~mask] == -1).all())


def test_mask_is_checked(digits):
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16)
    x = _batch(digits)
    with pytest.raises(InputDtypeError, match="bool"):
        vq(x, mask=torch.ones(4, 32))
    with pytest.raises(InputShapeError, match="mask"):
        vq(x, mask=torch.ones(4, 31, dtype=torch.bool))
    with pytest.raises(UnsupportedOptionError, match="not both"):
        vq(x, mask=torch.ones(4, 32, dtype=torch.bool), lens=torch.full((4,), 32))
    image = vqdeploy.VectorQuantize(dim=64, codebook_size=16, accept_image_fmap=True)
    with pytest.raises(UnsupportedOptionError, match="feature maps"):
        image(torch.randn(1, 64, 4, 4), mask=torch.ones(1, 16, dtype=torch.bool))


def test_residual_vq_mask_pads_every_stage(digits):
    x = _batch(digits)
    mask = torch.arange(32)[None] < torch.tensor([32, 3, 17, 9])[:, None]
    rvq = vqdeploy.ResidualVQ(dim=64, num_quantizers=3, codebook_size=16).train()
    packed = copy.deepcopy(rvq)
    q, idx, losses = rvq(x, mask=mask)
    pq, pidx, plosses = packed(x[mask][None])
    assert bool((idx[:, ~mask] == -1).all()) and torch.equal(idx[:, mask], pidx[:, 0])
    torch.testing.assert_close(losses, plosses, **TOL)
    torch.testing.assert_close(q[mask], pq[0], **TOL)
    assert bool((q[~mask] == 0).all())


# -- top-k ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_topk_returns_the_k_nearest_codes_nearest_first(training, digits):
    x = _batch(digits)
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16).train(training)
    before = _state(vq)
    q, idx, loss = vq(x, topk=3)
    assert q.shape == (4, 32, 3, 64) and idx.shape == (4, 32, 3) and loss.shape == (4, 32, 3)
    distances = torch.cdist(x.reshape(-1, 64).double(), vq.codebook.double())
    order = distances.argsort(dim=-1)[:, :3].reshape(4, 32, 3)
    assert torch.equal(idx[..., 0], order[..., 0])
    assert torch.equal(idx.sort(-1).values, order.sort(-1).values)
    torch.testing.assert_close(q, vq.codebook[idx], **TOL)
    for name, value in _state(vq).items():  # top-k never updates the codebook
        assert torch.equal(value, before[name]), name
    plain = vq.eval()(x)
    assert torch.equal(plain[1], idx[..., 0])
    with pytest.raises(UnsupportedOptionError, match="heads=1"):
        vqdeploy.VectorQuantize(dim=64, codebook_size=16, heads=2)(x, topk=2)


# -- EMA updates by hand ----------------------------------------------------------------------------------------
def test_manual_ema_update_equals_the_automatic_one(digits):
    x = _batch(digits)
    auto = vqdeploy.VectorQuantize(dim=64, codebook_size=16, decay=0.5, threshold_ema_dead_code=0).train()
    manual = copy.deepcopy(auto)
    mask = torch.arange(32)[None] < torch.tensor([32, 8, 30, 2])[:, None]
    q1, idx1, _ = auto(x, mask=mask)
    q2, idx2, _ = manual(x, mask=mask, ema_update=False)
    assert torch.equal(idx1, idx2) and torch.equal(q1, q2)
    assert not torch.equal(auto._codebook.embed_avg, manual._codebook.embed_avg)
    manual.update_ema_indices(x, idx2, mask=mask)
    for name, value in _state(auto).items():
        torch.testing.assert_close(_state(manual)[name], value, **TOL, msg=name)


def test_manual_ema_update_option_tracks_and_waits_for_the_caller(digits):
    x = _batch(digits)
    auto = vqdeploy.VectorQuantize(dim=64, codebook_size=16).train()
    manual = vqdeploy.VectorQuantize(dim=64, codebook_size=16, manual_ema_update=True).train()
    manual.load_state_dict(auto.state_dict())
    auto(x)
    embed = manual._codebook.embed.clone()
    manual(x)
    assert torch.equal(manual._codebook.embed, embed)  # statistics moved, codes not yet
    torch.testing.assert_close(manual._codebook.embed_avg, auto._codebook.embed_avg, **TOL)
    manual._codebook.update_ema()
    torch.testing.assert_close(manual._codebook.embed, auto._codebook.embed, **TOL)


def test_accumulated_statistics_fold_into_one_update(digits):
    x = _batch(digits)
    accumulated = vqdeploy.VectorQuantize(dim=64, codebook_size=16, decay=0.5).train()
    once = copy.deepcopy(accumulated)
    accumulated(x[:2], accum_ema_update=True)
    assert torch.equal(accumulated._codebook.embed, once._codebook.embed)  # nothing moved yet
    accumulated(x[2:])
    once(x)  # the same rows in one batch (the codebook searched was the same)
    for name, value in _state(once).items():
        torch.testing.assert_close(_state(accumulated)[name], value, **TOL, msg=name)


def test_ema_update_weight_holds_codes_still(digits):
    x = _batch(digits)
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16).train()
    before = _state(vq)
    weight = torch.ones(16)
    weight[:8] = 0
    vq(x, ema_update_weight=weight)
    assert torch.equal(vq._codebook.cluster_size[:, :8], before["cluster_size"][:, :8])
    assert not torch.equal(vq._codebook.cluster_size[:, 8:], before["cluster_size"][:, 8:])
    with pytest.raises(InputShapeError, match="ema_update_weight"):
        vq(x, ema_update_weight=torch.ones(3))


# -- gradients and losses ---------------------------------------------------------------------------------------
def test_learnable_codebook_learns_by_gradient(digits):
    x = _batch(digits)
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16, learnable_codebook=True, ema_update=False).train()
    assert isinstance(vq._codebook.embed, torch.nn.Parameter)
    _, _, loss = vq(x)
    loss.sum().backward()
    assert vq._codebook.embed.grad is not None and vq._codebook.embed.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="ema_update=False"):
        vqdeploy.VectorQuantize(dim=64, codebook_size=16, learnable_codebook=True)


def test_orthogonal_regulariser_is_zero_for_orthonormal_codes():
    codes = torch.eye(8)[None]
    torch.testing.assert_close(orthogonal_loss(codes), torch.tensor(0.0))
    assert orthogonal_loss(torch.ones(1, 4, 8)) > 0.5  # all codes parallel


def test_loss_breakdown_adds_up(digits):
    x = _batch(digits)
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16, commitment=0.5, orthogonal_reg_weight=0.2,
                                 codebook_diversity_loss_weight=0.3).train()
    _, _, loss, parts = vq(x, return_loss_breakdown=True)
    torch.testing.assert_close(loss, (0.3 * parts.codebook_diversity + 0.5 * parts.commitment
                                      + 0.2 * parts.orthogonal_reg).reshape(1), **TOL)
    assert parts.codebook_diversity <= 0 and parts.orthogonal_reg > 0 and float(parts.inplace_optimize) == 0.0


def test_cross_entropy_commitment_is_the_cross_entropy_of_the_distances(digits):
    x = _batch(digits)
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16, commitment_use_cross_entropy_loss=True).train()
    frozen = copy.deepcopy(vq)
    _, idx, loss = vq(x)
    logits = -torch.cdist(x.reshape(-1, 64), frozen.codebook)
    torch.testing.assert_close(loss, F.cross_entropy(logits, idx.reshape(-1)).reshape(1), rtol=1e-4, atol=1e-4)


def test_stochastic_sampling_acts_in_training_only(digits):
    x = _batch(digits)
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16, stochastic_sample_codes=True, sample_codebook_temp=10.0,
                                 freeze_codebook=True)
    nearest = vq.eval()(x)[1]
    sampled = vq.train()(x)[1]
    assert not torch.equal(sampled, nearest)
    assert torch.equal(vq.train()(x, sample_codebook_temp=0.0)[1], nearest)  # temperature 0: the argmin


def test_straight_through_sends_gradients_through_the_distances(digits):
    x = _batch(digits)
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16, codebook_dim=8, straight_through=True, commitment=0.0).train()
    q, _, _ = vq(x)  # x needs no gradient: the output's gradient goes through the soft assignment
    q.sum().backward()
    assert vq.project_in.weight.grad is not None and vq.project_in.weight.grad.abs().sum() > 0


def test_route_gradients_to_input_off_stops_the_output_gradient(digits):
    x = _batch(digits).requires_grad_()
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16, route_gradients_to_input=False, commitment=0.0).train()
    q, _, _ = vq(x)
    assert not q.requires_grad


# -- layouts and health -------------------------------------------------------------------------------------------
def test_accept_3d_fmap_round_trips(digits):
    vq = vqdeploy.VectorQuantize(dim=8, codebook_size=16, accept_3d_fmap=True).eval()
    x = torch.randn(2, 8, 3, 4, 5)
    q, idx, _ = vq(x)
    assert q.shape == x.shape and idx.shape == (2, 3, 4, 5)
    assert torch.equal(vq.get_output_from_indices(idx), q)
    with pytest.raises(InputShapeError, match="rank 5"):
        vq(torch.randn(2, 8, 4, 5))


def test_affine_param_is_the_identity_until_trained_and_frozen_in_eval(digits):
    x = _batch(digits) * 3 + 1
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16, affine_param=True)
    plain = vqdeploy.VectorQuantize(dim=64, codebook_size=16)
    plain.load_state_dict(vq.state_dict(), strict=False)
    assert torch.equal(vq.eval()(x)[1], plain.eval()(x)[1])
    vq.train()(x)
    stats = vq._codebook.batch_mean.clone()
    torch.testing.assert_close(stats[0, 0], x.reshape(-1, 64).mean(0), **TOL)
    q, idx, _ = vq.eval()(x)
    assert torch.equal(vq._codebook.batch_mean, stats)
    assert torch.equal(vq.get_output_from_indices(idx), q)


def test_codebook_usage_reports_perplexity_and_dead_codes(digits):
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=16, threshold_ema_dead_code=0.5)
    usage = vq.codebook_usage()
    assert usage.perplexity == [pytest.approx(16.0)] and usage.dead_codes == [0]  # fresh: every size 1
    vq._codebook.cluster_size[0, :4] = 0.0
    usage = vq.codebook_usage()
    assert usage.dead_codes == [4] and usage.perplexity[0] == pytest.approx(12.0)
    rvq = vqdeploy.ResidualVQ(dim=64, num_quantizers=2, codebook_size=16).train()
    rvq(_batch(digits))
    assert len(rvq.codebook_usage()) == 2 and all(1 <= u.perplexity[0] <= 16 for u in rvq.codebook_usage())


def test_training_options_are_checked():
    with pytest.raises(ConfigError, match="unknown arguments"):
        vqdeploy.VectorQuantize(dim=8, codebook_size=4, orthogonal_weight=1.0)
    with pytest.raises(ConfigError, match="pick one"):
        vqdeploy.VectorQuantize(dim=8, codebook_size=4, straight_through=True, rotation_trick=True)
    with pytest.raises(ConfigError, match="affine_param"):
        vqdeploy.VectorQuantize(dim=8, codebook_size=4, affine_param=True, use_cosine_sim=True)
    options = vqdeploy.TrainingOptions(orthogonal_reg_weight=0.1)
    vq = vqdeploy.VectorQuantize(dim=8, codebook_size=4, training_options=options)
    assert vq.config["orthogonal_reg_weight"] == 0.1 and "stochastic_sample_codes" not in vq.config


# -- ResidualVQ ----------------------------------------------------------------------------------------------------------
def test_one_codebook_size_per_stage(digits):
    rvq = vqdeploy.ResidualVQ(dim=64, num_quantizers=None, codebook_size=(4, 32, 8)).eval()
    assert rvq.num_quantizers == 3 and [layer.codebook_size for layer in rvq.layers] == [4, 32, 8]
    q, idx, _ = rvq(_batch(digits))
    assert all(int(idx[s].max()) < size for s, size in enumerate((4, 32, 8)))
    assert torch.equal(rvq.get_output_from_indices(idx), q)
    assert isinstance(rvq.codebooks, tuple)
    with pytest.raises(ConfigError, match="shared_codebook"):
        vqdeploy.ResidualVQ(dim=64, num_quantizers=None, codebook_size=(4, 8), shared_codebook=True)


@pytest.mark.parametrize("train", [False, True])
def test_implicit_neural_codebook_decodes_what_it_quantizes(train, digits, tmp_path):
    rvq = compat.ResidualVQ(dim=64, num_quantizers=3, codebook_size=16, implicit_neural_codebook=True,
                            mlp_kwargs=dict(depth=2, dim_hidden=32)).train(train)
    x = _batch(digits).requires_grad_()
    q, idx, losses = rvq(x)
    torch.testing.assert_close(rvq.get_output_from_indices(idx), q, **TOL)
    if train:
        (q.square().sum() + losses.sum()).backward()
        assert rvq.mlps[0].proj_in.weight.grad is not None  # the MLPs learn
    with pytest.raises(UnsupportedOptionError, match="implicit_neural_codebook"):
        vqdeploy.export_onnx(rvq.eval(), tmp_path / "rvq.onnx")


def test_quant_grad_frac_lets_later_stages_reach_earlier_ones(digits):
    x = _batch(digits)
    grads = []
    for frac in (0.0, 0.5):
        torch.manual_seed(0)
        rvq = vqdeploy.ResidualVQ(dim=64, num_quantizers=3, codebook_size=16, codebook_dim=8, quant_grad_frac=frac,
                                  freeze_codebook=True).train()
        q, _, losses = rvq(x.clone().requires_grad_())
        (q.square().sum() + losses.sum()).backward()
        grads.append(rvq.project_in.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_quantize_dropout_with_a_fixed_seed_is_reproducible(digits):
    rvq = vqdeploy.ResidualVQ(dim=64, num_quantizers=6, codebook_size=16, quantize_dropout=True,
                              freeze_codebook=True).train()
    x = _batch(digits)
    first = rvq(x, rand_quantize_dropout_fixed_seed=11)[1]
    assert torch.equal(rvq(x, rand_quantize_dropout_fixed_seed=11)[1], first)
    dropped = (first == -1).all(dim=(1, 2))
    assert bool(dropped.any()) or not bool((first == -1).any())
    assert torch.equal(dropped, dropped.cummax(0).values)  # once a stage is dropped, the rest are


# -- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kwargs, name", [
    (compat.ResidualVQ, dict(num_quantizers=2, codebook_size=8, diveq=True), "diveq"),
    (compat.VectorQuantize, dict(codebook_size=8, directional_reparam=True, threshold_ema_dead_code=1),
     "directional_reparam"),
    (compat.VectorQuantize, dict(codebook_size=8, vq_bridge=torch.nn.Identity()), "vq_bridge"),
    (compat.VectorQuantize, dict(codebook_size=8, in_place_codebook_optimizer=torch.optim.SGD),
     "in_place_codebook_optimizer"),
    (compat.ResidualVQ, dict(num_quantizers=2, codebook_size=8, beam_size=2), "beam_size"),
    (compat.ResidualVQ, dict(num_quantizers=2, codebook_size=8, beam_size=2, eval_beam_size=4), "beam_size"),
])
def test_options_vqdeploy_does_not_implement_are_refused_by_name(cls, kwargs, name):
    with pytest.raises(UnsupportedOptionError, match=name):
        cls(dim=16, **kwargs)


def test_beam_size_in_forward_is_refused_unless_greedy(digits):
    rvq = compat.ResidualVQ(dim=64, num_quantizers=2, codebook_size=8)
    rvq(_batch(digits), beam_size=1)
    with pytest.raises(UnsupportedOptionError, match="beam_size"):
        rvq(_batch(digits), beam_size=2)
