"""Every row of the migration table against the installed vector-quantize-pytorch 1.32.

Native options: convert, identical eval tokens and outputs, and one training step (output, loss,
input gradient, EMA state) within 1e-5. Refused options: refused by name, with the reason.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import vqdeploy
from vqdeploy.errors import UnsupportedOptionError
from vqdeploy.nn import conventions as conv

reference = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is a test dependency")

TOL = dict(rtol=1e-5, atol=1e-5)

# One non-default setting per native VectorQuantize option (dim 64 unless the case says).
VQ_NATIVE = {
    "plain": dict(codebook_size=64),
    "codebook_dim": dict(codebook_size=64, codebook_dim=16),
    "heads": dict(codebook_size=32, heads=4, codebook_dim=16),
    "separate_codebook_per_head": dict(codebook_size=32, heads=4, codebook_dim=16, separate_codebook_per_head=True),
    "decay": dict(codebook_size=64, decay=0.5),
    "eps": dict(codebook_size=64, eps=1e-2),
    "freeze_codebook": dict(codebook_size=64, freeze_codebook=True),
    "kmeans_init": dict(codebook_size=32, kmeans_init=True, kmeans_iters=3),
    "use_cosine_sim": dict(codebook_size=64, use_cosine_sim=True),
    "layernorm_after_project_in": dict(codebook_size=64, codebook_dim=16, layernorm_after_project_in=True),
    "threshold_ema_dead_code": dict(codebook_size=64, threshold_ema_dead_code=2),
    "channel_last": dict(codebook_size=64, channel_last=False),
    "accept_image_fmap": dict(codebook_size=64, accept_image_fmap=True),
    "commitment_weight": dict(codebook_size=64, commitment_weight=0.25),
    "rotation_trick_off": dict(codebook_size=64, rotation_trick=False),
    "ema_update": dict(codebook_size=64, ema_update=False, threshold_ema_dead_code=1),
    "sync_codebook_false": dict(codebook_size=64, sync_codebook=False),
    # inert: no effect without the option they belong to; convert and train identically
    "sample_codebook_temp": dict(codebook_size=64, sample_codebook_temp=0.5),
    "codebook_diversity_temperature": dict(codebook_size=64, codebook_diversity_temperature=3.0),
    "return_zeros_for_masked_padding": dict(codebook_size=64, return_zeros_for_masked_padding=False),
}

# Training options that 1.32 added since the seed: each trains like the reference (one step).
VQ_TRAINING = {
    "commitment_use_cross_entropy_loss": dict(codebook_size=64, commitment_use_cross_entropy_loss=True),
    "orthogonal_reg_weight": dict(codebook_size=64, orthogonal_reg_weight=10.0),
    "orthogonal_reg_active_codes_only": dict(codebook_size=64, orthogonal_reg_weight=1.0,
                                             orthogonal_reg_active_codes_only=True),
    "codebook_diversity_loss_weight": dict(codebook_size=64, codebook_diversity_loss_weight=1.0,
                                           codebook_diversity_temperature=3.0),
    "stochastic_sample_codes": dict(codebook_size=64, stochastic_sample_codes=True, sample_codebook_temp=0.5),
    "straight_through": dict(codebook_size=64, straight_through=True, rotation_trick=False),
    "stochastic_straight_through": dict(codebook_size=64, stochastic_sample_codes=True, straight_through=True,
                                        rotation_trick=False),
    "manual_ema_update": dict(codebook_size=64, manual_ema_update=True),
    "learnable_codebook": dict(codebook_size=64, learnable_codebook=True, ema_update=False),
    "sync_update_v": dict(codebook_size=64, learnable_codebook=True, ema_update=False, sync_update_v=0.5),
    "route_gradients_to_input": dict(codebook_size=64, route_gradients_to_input=False),
    "layernorm_heads": dict(codebook_size=32, heads=2, codebook_dim=16, separate_codebook_per_head=True,
                            commitment_use_cross_entropy_loss=True),
}

VQ_REFUSED = {
    "directional_reparam": dict(codebook_size=64, directional_reparam=True, threshold_ema_dead_code=1),
    "vq_bridge": dict(codebook_size=64, vq_bridge=nn.Identity(), learnable_codebook=True, ema_update=False),
    "in_place_codebook_optimizer": dict(codebook_size=64, learnable_codebook=True, ema_update=False,
                                        in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.1)),
}


def _input(digits: torch.Tensor, kwargs: dict, n: int = 512) -> torch.Tensor:
    x = digits[:n].reshape(8, n // 8, 64).clone()
    if kwargs.get("accept_image_fmap"):
        return x.reshape(8, 8, 8, 64).permute(0, 3, 1, 2).contiguous()
    if kwargs.get("channel_last") is False:
        return x.transpose(1, 2).contiguous()
    return x


def _convert(ref: nn.Module) -> nn.Module:
    cls = vqdeploy.ResidualVQ if isinstance(ref, reference.ResidualVQ) else vqdeploy.VectorQuantize
    cls = vqdeploy.GroupedResidualVQ if isinstance(ref, reference.GroupedResidualVQ) else cls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_vector_quantize_pytorch(copy.deepcopy(ref))


def _train_step(module: nn.Module, x: torch.Tensor, seed: int = 1, **forward) -> tuple:
    """One training forward and backward; returns output, indices, loss, input gradient."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    quantized, indices, loss = module.train()(x, **forward)[:3]
    weight = torch.linspace(-1, 1, quantized.numel()).reshape(quantized.shape)
    ((quantized * weight).sum() + loss.sum()).backward()
    return quantized.detach(), indices, loss.detach(), x.grad


def _codebooks(module: nn.Module) -> list[nn.Module]:
    if hasattr(module, "rvqs"):
        return [layer._codebook for rvq in module.rvqs for layer in rvq.layers]
    return [layer._codebook for layer in module.layers] if hasattr(module, "layers") else [module._codebook]


def _assert_training_step_matches(ref: nn.Module, ours: nn.Module, x: torch.Tensor, **forward) -> None:
    ref_q, ref_idx, ref_loss, ref_grad = _train_step(ref, x, **forward)
    q, idx, loss, grad = _train_step(ours, x, **forward)
    assert torch.equal(idx, ref_idx)
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(q, ref_q, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    for ours_codebook, ref_codebook in zip(_codebooks(ours), _codebooks(ref), strict=True):
        for name in ("embed", "embed_avg", "cluster_size", "initted"):
            torch.testing.assert_close(getattr(ours_codebook, name), getattr(ref_codebook, name).detach(), **TOL,
                                       msg=name)


def _assert_eval_matches(ref: nn.Module, ours: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref_q, ref_idx, ref_loss = ref.eval()(x)[:3]
        q, idx, loss = ours.eval()(x)[:3]
    assert torch.equal(idx, ref_idx)
    assert loss.shape == ref_loss.shape  # 1.32's conventions: scalar (VQ) / (q,) (RVQ)
    torch.testing.assert_close(q, ref_q, rtol=1e-6, atol=1e-6)
    want = ref.get_output_from_indices(ref_idx)
    if getattr(ref, "heads", 1) > 1 and not ref.separate_codebook_per_head:
        want = want.flatten(-2)  # 1.32 returns (b, n, heads, d) here (and fails with a projection); vqdeploy (b, n, heads * d)
    torch.testing.assert_close(ours.get_output_from_indices(idx), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", VQ_NATIVE)
def test_native_vq_option_converts_and_trains_like_the_reference(case, digits):
    kwargs = VQ_NATIVE[case]
    torch.manual_seed(0)
    ref = reference.VectorQuantize(dim=64, **kwargs)
    x = _input(digits, kwargs)
    if kwargs.get("kmeans_init"):  # a converted uninitialised codebook: k-means on the first batch, both sides
        ours = _convert(ref)
        _assert_training_step_matches(ref, ours, x)
    else:
        ours = _convert(ref)
        assert ours.conventions == conv.REFERENCE
        _assert_eval_matches(ref, ours, x)
        _assert_training_step_matches(ref, ours, x)
    _assert_eval_matches(ref, ours, x)


@pytest.mark.parametrize("case", VQ_NATIVE)
def test_compat_constructor_builds_what_the_reference_builds(case, digits):
    """Same arguments through vqdeploy.compat, the reference's weights loaded: the same training step."""
    from vqdeploy.compat.vector_quantize_pytorch import VectorQuantize

    kwargs = VQ_NATIVE[case]
    ref = reference.VectorQuantize(dim=64, **kwargs)
    ours = VectorQuantize(dim=64, **kwargs)
    ours.load_state_dict(ref.state_dict())
    _assert_training_step_matches(ref, ours, _input(digits, kwargs))


@pytest.mark.parametrize("case", VQ_TRAINING)
def test_training_option_converts_and_trains_like_the_reference(case, digits):
    kwargs = VQ_TRAINING[case]
    torch.manual_seed(0)
    ref = reference.VectorQuantize(dim=64, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: the converter warns about nothing
        ours = vqdeploy.VectorQuantize.from_vector_quantize_pytorch(copy.deepcopy(ref))
    x = _input(digits, kwargs)
    _assert_eval_matches(ref, ours, x)
    _assert_training_step_matches(ref, ours, x)
    _assert_eval_matches(ref, ours, x)
    from vqdeploy.compat.vector_quantize_pytorch import VectorQuantize

    built = VectorQuantize(dim=64, **kwargs)
    built.load_state_dict(ref.state_dict())
    _assert_training_step_matches(ref, built, x, seed=2)


def test_affine_param_trains_like_the_reference(digits):
    """affine_param: training steps match 1.32 (statistics, EMA, codes); eval freezes the statistics."""
    from vqdeploy.compat.vector_quantize_pytorch import VectorQuantize

    torch.manual_seed(0)
    kwargs = dict(codebook_size=64, affine_param=True, affine_param_batch_decay=0.9, affine_param_codebook_decay=0.5)
    ref = reference.VectorQuantize(dim=64, **kwargs)
    ours = VectorQuantize(dim=64, **kwargs)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items()}, strict=False)
    ours._codebook.embed.copy_(ref._codebook.embed)
    x = _input(digits, {})
    for step in range(2):
        _assert_training_step_matches(ref, ours, x[:, step::2].contiguous(), seed=step)
        for name in ("batch_mean", "batch_variance", "codebook_mean", "codebook_variance"):
            torch.testing.assert_close(getattr(ours._codebook, name), getattr(ref._codebook, name), **TOL, msg=name)
    converted = _convert(ref)  # carries the statistics over
    with torch.no_grad():
        before = converted._codebook.batch_mean.clone()
        converted.eval()(x)
        assert torch.equal(converted._codebook.batch_mean, before)  # eval does not move them
        _, idx, _ = converted(x)
        assert torch.equal(converted.get_output_from_indices(idx), converted(x)[0])


def test_accept_3d_fmap_matches_the_reference(digits):
    kwargs = dict(codebook_size=64, accept_3d_fmap=True)
    ref = reference.VectorQuantize(dim=64, **kwargs)
    ours = _convert(ref)
    x = digits[:512].reshape(2, 4, 8, 8, 64).permute(0, 4, 1, 2, 3).contiguous()
    _assert_eval_matches(ref, ours, x)
    _assert_training_step_matches(ref, ours, x)


@pytest.mark.parametrize("case", VQ_REFUSED)
def test_refused_option_is_named_with_why(case):
    from vqdeploy.compat.vector_quantize_pytorch import VectorQuantize

    kwargs = VQ_REFUSED[case]
    ref = reference.VectorQuantize(dim=64, **kwargs)
    why = conv.VQ_OPTIONS[case].why
    with pytest.raises(UnsupportedOptionError, match=case) as error:
        vqdeploy.VectorQuantize.from_vector_quantize_pytorch(ref)
    assert why in str(error.value)
    with pytest.raises(UnsupportedOptionError, match=case):
        VectorQuantize(dim=64, **kwargs)


def test_only_the_option_set_is_named():
    """The refusal names the option that was set, not one the user never passed."""
    ref = reference.VectorQuantize(dim=16, codebook_size=32, learnable_codebook=True, ema_update=False,
                                   in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    with pytest.raises(UnsupportedOptionError) as error:
        vqdeploy.VectorQuantize.from_vector_quantize_pytorch(ref)
    message = str(error.value)
    assert "in_place_codebook_optimizer" in message and "learnable_codebook" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a native option: no warning at all
        vqdeploy.VectorQuantize.from_vector_quantize_pytorch(reference.VectorQuantize(dim=16, codebook_size=32,
                                                                                     ema_update=False))


def test_synchronised_codebook_is_refused_until_vqdeploy_syncs():
    ref = reference.VectorQuantize(dim=16, codebook_size=32, sync_codebook=True)
    if conv.native_accepts(vqdeploy.VectorQuantize, "sync_codebook"):
        assert _convert(ref)._codebook.sync_codebook is True  # not in config: checkpoints stay unchanged
    else:
        with pytest.raises(UnsupportedOptionError, match="sync_codebook"):
            vqdeploy.VectorQuantize.from_vector_quantize_pytorch(ref)


# -- forward arguments -------------------------------------------------------------------------------------
_MASK = torch.arange(64)[None, :] < torch.tensor([64, 40, 10, 64, 1, 33, 64, 50])[:, None]


@pytest.mark.parametrize("forward", [
    dict(freeze_codebook=True), dict(ema_update=False), dict(sample_codebook_temp=0.3), dict(mask=_MASK),
    dict(lens=torch.tensor([64, 40, 10, 64, 1, 33, 64, 50])), dict(ema_update_weight=torch.linspace(0, 1, 64)),
    dict(ema_update_weight=lambda sums, counts: (counts > 0).float()),
])
def test_native_vq_forward_argument_trains_like_the_reference(forward, digits):
    ref = reference.VectorQuantize(dim=64, codebook_size=64)
    _assert_training_step_matches(ref, _convert(ref), _input(digits, {}), **forward)


@pytest.mark.parametrize("kwargs", [dict(), dict(return_zeros_for_masked_padding=False)])
def test_masked_forward_matches_the_reference(kwargs, digits):
    ref = reference.VectorQuantize(dim=64, codebook_size=64, threshold_ema_dead_code=3, **kwargs)
    _assert_training_step_matches(ref, _convert(ref), _input(digits, {}), mask=_MASK)


@pytest.mark.parametrize("kwargs", [dict(use_cosine_sim=True), dict(codebook_dim=16), dict(heads=2, codebook_dim=8)])
def test_masked_loss_is_the_loss_of_the_unpadded_tokens(kwargs, digits):
    """A padded batch's loss and tokens are those of its valid tokens alone, in codebook space (1.32 compares
    the input itself here, which differs once the codebook space does: cosine, projections, heads)."""
    vq = vqdeploy.VectorQuantize(dim=64, codebook_size=32, freeze_codebook=True, **kwargs).train()
    x = _input(digits, {})
    _, idx, loss = vq(x, mask=_MASK)
    _, packed_idx, packed_loss = vq(x[_MASK][None])
    torch.testing.assert_close(loss, packed_loss, **TOL)
    assert torch.equal(idx[_MASK], packed_idx[0])


@pytest.mark.parametrize("training", [False, True])
def test_topk_matches_the_reference(training, digits):
    ref = reference.VectorQuantize(dim=64, codebook_size=64)
    ours = _convert(ref)
    x = _input(digits, {})
    with torch.no_grad():
        want = ref.train(training)(x, topk=3, mask=_MASK)
        got = ours.train(training)(x, topk=3, mask=_MASK)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[2], want[2], **TOL)


def test_accumulated_ema_update_matches_the_reference(digits):
    ref = reference.VectorQuantize(dim=64, codebook_size=64)
    ours = _convert(ref)
    x = _input(digits, {})
    for module in (ref, ours):
        module.train()(x[:4], accum_ema_update=True)
        module(x[4:])
    for name in ("embed", "embed_avg", "cluster_size"):
        torch.testing.assert_close(getattr(ours._codebook, name), getattr(ref._codebook, name), **TOL, msg=name)


def test_loss_breakdown_matches_the_reference(digits):
    ref = reference.VectorQuantize(dim=64, codebook_size=64, orthogonal_reg_weight=0.5,
                                   codebook_diversity_loss_weight=0.1)
    ours = _convert(ref)
    x = _input(digits, {})
    torch.manual_seed(3)
    want = ref.train()(x, return_loss_breakdown=True)[3]
    torch.manual_seed(3)
    got = ours.train()(x, return_loss_breakdown=True)[3]
    for name in ("commitment", "codebook_diversity", "orthogonal_reg"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name).detach(), **TOL, msg=name)


@pytest.mark.parametrize("kwargs, topk", [
    (dict(codebook_size=64, codebook_dim=16), None),
    (dict(codebook_size=64, codebook_dim=16), 2),  # topk takes heads=1 (as in 1.32)
    (dict(codebook_size=32, heads=2, codebook_dim=16, separate_codebook_per_head=True), None),
    (dict(codebook_size=32, heads=2, codebook_dim=16, use_cosine_sim=True), None),
])
def test_cross_entropy_mode_matches_the_reference(kwargs, topk, digits):
    """forward(x, indices=codes): 1.32's (codebook-space quantized, cross entropy), gradients, EMA step."""
    ref = reference.VectorQuantize(dim=64, **kwargs)
    ours = _convert(ref)
    x = _input(digits, {}, n=256)
    heads = kwargs.get("heads", 1)
    codes = torch.randint(-1, kwargs["codebook_size"], (8, 32, heads) if heads > 1 else (8, 32),
                          generator=torch.Generator().manual_seed(0))
    for mode in ("eval", "train"):
        x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        want = getattr(ref, mode)()(x_ref, indices=codes, topk=topk)
        got = getattr(ours, mode)()(x_ours, indices=codes, topk=topk)
        assert len(got) == 2 and got[0].shape == want[0].shape and got[1].shape == want[1].shape == ()
        torch.testing.assert_close(got[0], want[0].detach(), **TOL)
        torch.testing.assert_close(got[1], want[1].detach(), **TOL)
        (want[0].sum() + want[1]).backward()
        (got[0].sum() + got[1]).backward()
        torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(ours.codebook, ref.codebook.detach(), **TOL)  # the training call's EMA step


# -- ResidualVQ -------------------------------------------------------------------------------------------
RVQ_NATIVE = {
    "plain": dict(num_quantizers=4, codebook_size=64),
    "codebook_size_tuple": dict(codebook_size=(32, 32, 32)),
    "codebook_dim": dict(num_quantizers=3, codebook_size=32, codebook_dim=16),
    "shared_codebook": dict(num_quantizers=3, codebook_size=32, shared_codebook=True),
    "shared_codebook_dead_codes": dict(num_quantizers=3, codebook_size=64, shared_codebook=True,
                                       threshold_ema_dead_code=2),
    "quantize_dropout": dict(num_quantizers=6, codebook_size=16, quantize_dropout=True,
                             quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2),
    "stage_options": dict(num_quantizers=3, codebook_size=32, use_cosine_sim=True, decay=0.5,
                          threshold_ema_dead_code=2, commitment_weight=0.5),
    "rotation_trick_off": dict(num_quantizers=3, codebook_size=32, rotation_trick=False),
    "inert": dict(num_quantizers=3, codebook_size=32, mlp_kwargs=dict(depth=2),
                  beam_score_quantizer_weights=[1.0, 0.5, 0.25], return_zeros_for_masked_padding=False),
    "codebook_sizes_per_stage": dict(codebook_size=(16, 64, 32)),
    "quant_grad_frac": dict(num_quantizers=3, codebook_size=32, quant_grad_frac=0.5),
    "implicit_neural_codebook": dict(num_quantizers=3, codebook_size=16, implicit_neural_codebook=True,
                                     mlp_kwargs=dict(depth=2, dim_hidden=32)),
    "stage_training_options": dict(num_quantizers=2, codebook_size=32, learnable_codebook=True, ema_update=False,
                                   orthogonal_reg_weight=0.1),
}

RVQ_REFUSED = {
    "diveq": dict(num_quantizers=2, codebook_size=16, diveq=True, rotation_trick=False),
    "accept_image_fmap": dict(num_quantizers=2, codebook_size=16, accept_image_fmap=True),
    "beam_size": dict(num_quantizers=2, codebook_size=16, beam_size=2),
}


@pytest.mark.parametrize("case", RVQ_NATIVE)
def test_native_rvq_option_converts_and_trains_like_the_reference(case, digits):
    kwargs = RVQ_NATIVE[case]
    ref = reference.ResidualVQ(dim=64, **kwargs)
    ours = _convert(ref)
    x = _input(digits, {})
    _assert_eval_matches(ref, ours, x)
    forward = dict(rand_quantize_dropout_fixed_seed=5) if kwargs.get("quantize_dropout") else {}
    _assert_training_step_matches(ref, ours, x, **forward)
    _assert_eval_matches(ref, ours, x)


@pytest.mark.parametrize("case", RVQ_NATIVE)
def test_compat_rvq_constructor_builds_what_the_reference_builds(case, digits):
    from vqdeploy.compat.vector_quantize_pytorch import ResidualVQ

    kwargs = RVQ_NATIVE[case]
    ref = reference.ResidualVQ(dim=64, **kwargs)
    ours = ResidualVQ(dim=64, **kwargs)
    ours.load_state_dict(ref.state_dict())
    forward = dict(rand_quantize_dropout_fixed_seed=3) if kwargs.get("quantize_dropout") else {}
    _assert_training_step_matches(ref, ours, _input(digits, {}), **forward)


@pytest.mark.parametrize("case", RVQ_REFUSED)
def test_refused_rvq_option_is_named(case):
    from vqdeploy.compat.vector_quantize_pytorch import ResidualVQ

    kwargs = RVQ_REFUSED[case]
    ref = reference.ResidualVQ(dim=64, **kwargs)
    with pytest.raises(UnsupportedOptionError, match=case):
        vqdeploy.ResidualVQ.from_vector_quantize_pytorch(ref)
    with pytest.raises(UnsupportedOptionError, match=case):
        ResidualVQ(dim=64, **kwargs)


def test_rvq_heads_and_eval_beam_size_are_refused_by_name():
    from vqdeploy.compat.vector_quantize_pytorch import ResidualVQ

    for kwargs in (dict(heads=2), dict(beam_size=2, eval_beam_size=2)):
        with pytest.raises(UnsupportedOptionError, match=next(iter(kwargs))):
            ResidualVQ(dim=16, num_quantizers=2, codebook_size=8, **kwargs)


@pytest.mark.parametrize("forward", [dict(freeze_codebook=True), dict(return_all_codes=True), dict(beam_size=1),
                                     dict(sample_codebook_temp=0.5), dict(mask=_MASK)])
def test_native_rvq_forward_argument_matches_the_reference(forward, digits):
    ref = reference.ResidualVQ(dim=64, num_quantizers=3, codebook_size=32)
    ours = _convert(ref)
    x = _input(digits, {})
    _assert_training_step_matches(ref, ours, x, **forward)
    if forward.get("return_all_codes"):
        with torch.no_grad():
            ref_codes = ref.eval()(x, return_all_codes=True)[3]
            codes = ours.eval()(x, return_all_codes=True)[3]
        torch.testing.assert_close(codes, ref_codes, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, value", [("indices", torch.zeros(8, 64, 3, dtype=torch.long)), ("beam_size", 2)])
def test_refused_rvq_forward_argument_is_named(name, value, digits):
    ours = _convert(reference.ResidualVQ(dim=64, num_quantizers=3, codebook_size=32))
    with pytest.raises(UnsupportedOptionError, match=name):
        ours(_input(digits, {}), **{name: value})


# -- the swapped-in module is a drop-in -----------------------------------------------------------------
class _Tokenizer(nn.Module):
    """A user's model: encoder, a 1.32 ResidualVQ, decoder; code written against 1.32's layouts."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(64, 32)
        self.vq = reference.ResidualVQ(dim=32, num_quantizers=3, codebook_size=32)
        self.decoder = nn.Linear(32, 64)

    def forward(self, x):
        quantized, indices, losses = self.vq(self.encoder(x))
        first_stage = indices[..., 0]  # (batch, seq, quantizer) in 1.32
        return self.decoder(quantized), first_stage, losses.sum()

    def decode(self, indices):
        return self.decoder(self.vq.get_output_from_indices(indices))


def test_converted_module_is_a_drop_in_inside_a_user_model(digits):
    model = _Tokenizer().eval()
    x = _input(digits, {})
    with torch.no_grad():
        want = model(x)
        want_indices = model.vq(model.encoder(x))[1]
        want_decoded = model.decode(want_indices)
    model.vq = vqdeploy.ResidualVQ.from_vector_quantize_pytorch(model.vq)
    with torch.no_grad():
        got = model(x)
        got_decoded = model.decode(want_indices)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], want[1]) and got[2].shape == want[2].shape
    torch.testing.assert_close(got_decoded, want_decoded, rtol=1e-6, atol=1e-6)


def test_every_reference_argument_is_in_the_tables():
    """The option tables list 1.32's constructor and forward arguments exactly, with 1.32's defaults."""
    import inspect

    for cls, table, forward in ((reference.VectorQuantize, conv.VQ_OPTIONS, conv.VQ_FORWARD),
                                (reference.ResidualVQ, conv.RVQ_OPTIONS, conv.RVQ_FORWARD),
                                (reference.GroupedResidualVQ, conv.GRVQ_OPTIONS, conv.GRVQ_FORWARD)):
        params = {k: v for k, v in inspect.signature(cls.__init__).parameters.items()
                  if k not in ("self", "vq_kwargs", "kwargs")}
        assert list(params) == list(table)
        assert all(table[k].default == v.default for k, v in params.items())
        forward_params = {k: v for k, v in inspect.signature(cls.forward).parameters.items() if k not in ("self", "x")}
        assert list(forward_params) == list(forward)
        assert all(forward[k].default == v.default for k, v in forward_params.items())


# -- GroupedResidualVQ ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(groups=2, num_quantizers=3, codebook_size=32),
                                    dict(groups=4, num_quantizers=2, codebook_size=16, codebook_dim=8,
                                         quantize_dropout=True)])
def test_grouped_residual_vq_converts_and_trains_like_the_reference(kwargs, digits):
    from vqdeploy.compat.vector_quantize_pytorch import GroupedResidualVQ

    ref = reference.GroupedResidualVQ(dim=64, **kwargs)
    ours = _convert(ref)
    x = _input(digits, {})
    with torch.no_grad():
        ref_q, ref_idx, ref_loss = ref.eval()(x)
        q, idx, loss = ours.eval()(x)
    assert torch.equal(idx, ref_idx) and loss.shape == ref_loss.shape
    torch.testing.assert_close(q, ref_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.get_output_from_indices(idx), ref.get_output_from_indices(ref_idx), rtol=1e-6,
                               atol=1e-6)
    built = GroupedResidualVQ(dim=64, **kwargs)
    built.load_state_dict(ref.state_dict())
    fresh = copy.deepcopy(ref)
    if not kwargs.get("quantize_dropout"):  # the dropout draw is random on both sides
        _assert_training_step_matches(ref, ours, x)
        _assert_training_step_matches(fresh, built, x, seed=4)
