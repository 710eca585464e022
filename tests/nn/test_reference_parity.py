"""Every row of the migration table against the installed vector-quantize-pytorch 1.32.

Native options: convert, identical eval tokens and outputs, and one training step (output, loss,
input gradient, EMA state) within 1e-5. Eval-only options: convert with identical eval output, a
training forward refuses them by name. Refused options: refused by name, with the reason.
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

# Options vqdeploy serves but does not train: (reference kwargs, the name a training forward gives).
VQ_EVAL_ONLY = {
    "commitment_use_cross_entropy_loss": dict(codebook_size=64, commitment_use_cross_entropy_loss=True),
    "orthogonal_reg_weight": dict(codebook_size=64, orthogonal_reg_weight=10.0),
    "codebook_diversity_loss_weight": dict(codebook_size=64, codebook_diversity_loss_weight=1.0),
    "stochastic_sample_codes": dict(codebook_size=64, stochastic_sample_codes=True),
    "straight_through": dict(codebook_size=64, straight_through=True, rotation_trick=False),
    "manual_ema_update": dict(codebook_size=64, manual_ema_update=True),
    "learnable_codebook": dict(codebook_size=64, learnable_codebook=True, ema_update=False),
    "in_place_codebook_optimizer": dict(codebook_size=64, learnable_codebook=True, ema_update=False,
                                        in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.1)),
    "sync_update_v": dict(codebook_size=64, learnable_codebook=True, ema_update=False, sync_update_v=0.5),
    "route_gradients_to_input": dict(codebook_size=64, route_gradients_to_input=False),
}

VQ_REFUSED = {
    "accept_3d_fmap": dict(codebook_size=64, accept_3d_fmap=True),
    "directional_reparam": dict(codebook_size=64, directional_reparam=True, threshold_ema_dead_code=1),
    "vq_bridge": dict(codebook_size=64, vq_bridge=nn.Identity(), learnable_codebook=True, ema_update=False),
    "affine_param": dict(codebook_size=64, affine_param=True),
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


@pytest.mark.parametrize("case", VQ_EVAL_ONLY)
def test_eval_only_option_converts_and_refuses_training_by_name(case, digits):
    kwargs = VQ_EVAL_ONLY[case]
    ref = reference.VectorQuantize(dim=64, **kwargs)
    with pytest.warns(UserWarning, match=case):
        ours = vqdeploy.VectorQuantize.from_vector_quantize_pytorch(copy.deepcopy(ref))
    x = _input(digits, kwargs)
    _assert_eval_matches(ref, ours, x)
    with pytest.raises(UnsupportedOptionError, match=case):
        ours.train()(x)
    from vqdeploy.compat.vector_quantize_pytorch import VectorQuantize

    with pytest.raises(UnsupportedOptionError, match=case):
        VectorQuantize(dim=64, **kwargs)


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
    """ema_update=False alone converts (no learnable_codebook blamed), and the message names what was set."""
    ref = reference.VectorQuantize(dim=16, codebook_size=32, orthogonal_reg_weight=1.0)
    with pytest.warns(UserWarning) as record:
        vqdeploy.VectorQuantize.from_vector_quantize_pytorch(ref)
    message = str(record[0].message)
    assert "orthogonal_reg_weight" in message and "learnable_codebook" not in message
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
@pytest.mark.parametrize("forward", [dict(freeze_codebook=True), dict(ema_update=False), dict(sample_codebook_temp=0.3)])
def test_native_vq_forward_argument_trains_like_the_reference(forward, digits):
    ref = reference.VectorQuantize(dim=64, codebook_size=64)
    _assert_training_step_matches(ref, _convert(ref), _input(digits, {}), **forward)


@pytest.mark.parametrize("name, value", [
    ("indices", torch.zeros(8, 64, dtype=torch.long)),
    ("mask", torch.ones(8, 64, dtype=torch.bool)),
    ("lens", torch.full((8,), 64)),
    ("topk", 2),
    ("return_loss_breakdown", True),
    ("codebook_transform_fn", lambda codes: codes),
    ("ema_update_weight", torch.ones(1)),
    ("accum_ema_update", True),
])
def test_refused_vq_forward_argument_is_named(name, value, digits):
    ours = _convert(reference.VectorQuantize(dim=64, codebook_size=64))
    with pytest.raises(UnsupportedOptionError, match=name):
        ours(_input(digits, {}), **{name: value})


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
}

RVQ_REFUSED = {
    "diveq": dict(num_quantizers=2, codebook_size=16, diveq=True, rotation_trick=False),
    "accept_image_fmap": dict(num_quantizers=2, codebook_size=16, accept_image_fmap=True),
    "implicit_neural_codebook": dict(num_quantizers=2, codebook_size=16, implicit_neural_codebook=True),
    "beam_size": dict(num_quantizers=2, codebook_size=16, beam_size=2),
    "codebook_size": dict(codebook_size=(16, 32)),
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


def test_quant_grad_frac_converts_for_eval_and_refuses_training(digits):
    ref = reference.ResidualVQ(dim=64, num_quantizers=2, codebook_size=32, quant_grad_frac=0.5)
    with pytest.warns(UserWarning, match="quant_grad_frac"):
        ours = vqdeploy.ResidualVQ.from_vector_quantize_pytorch(copy.deepcopy(ref))
    x = _input(digits, {})
    _assert_eval_matches(ref, ours, x)
    with pytest.raises(UnsupportedOptionError, match="quant_grad_frac"):
        ours.train()(x)


def test_eval_only_stage_option_in_a_residual_vq(digits):
    ref = reference.ResidualVQ(dim=64, num_quantizers=2, codebook_size=32, learnable_codebook=True, ema_update=False)
    with pytest.warns(UserWarning, match="learnable_codebook"):
        ours = vqdeploy.ResidualVQ.from_vector_quantize_pytorch(copy.deepcopy(ref))
    _assert_eval_matches(ref, ours, _input(digits, {}))
    with pytest.raises(UnsupportedOptionError, match="learnable_codebook"):
        ours.train()(_input(digits, {}))


@pytest.mark.parametrize("forward", [dict(freeze_codebook=True), dict(return_all_codes=True), dict(beam_size=1),
                                     dict(sample_codebook_temp=0.5)])
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


@pytest.mark.parametrize("name, value", [("mask", torch.ones(8, 64, dtype=torch.bool)),
                                         ("indices", torch.zeros(8, 64, 3, dtype=torch.long)), ("beam_size", 2)])
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
                                (reference.ResidualVQ, conv.RVQ_OPTIONS, conv.RVQ_FORWARD)):
        params = {k: v for k, v in inspect.signature(cls.__init__).parameters.items() if k not in ("self", "vq_kwargs")}
        assert list(params) == list(table)
        assert all(table[k].default == v.default for k, v in params.items())
        forward_params = {k: v for k, v in inspect.signature(cls.forward).parameters.items() if k not in ("self", "x")}
        assert list(forward_params) == list(forward)
        assert all(forward[k].default == v.default for k, v in forward_params.items())
