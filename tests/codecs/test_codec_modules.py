"""The modules the codecs need, on their own: layouts, stages used, training, errors."""

import pytest
import torch

import vqdeploy
from vqdeploy.errors import ConfigError, InputShapeError, UnsupportedOptionError
from vqdeploy.nn import FactorizedResidualVQ, ResidualVQ, SplitResidualVQ


def test_channel_first_residual_vq_is_the_channel_last_one_transposed():
    torch.manual_seed(0)
    last = ResidualVQ(dim=16, num_quantizers=3, codebook_size=32, codebook_dim=8).eval()
    first = ResidualVQ(dim=16, num_quantizers=3, codebook_size=32, codebook_dim=8, channel_last=False).eval()
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 16, 11)
    q_first, i_first, _ = first(x)
    q_last, i_last, _ = last(x.transpose(1, 2))
    assert torch.equal(i_first, i_last) and torch.equal(q_first, q_last.transpose(1, 2))
    assert torch.equal(first.get_output_from_indices(i_first), q_first)
    assert first.input_layout == "b d n" and first.config["channel_last"] is False
    assert "channel_last" not in last.config  # configs written before the option read the same
    with pytest.raises(InputShapeError):
        first(torch.randn(2, 11, 16))


def test_n_q_uses_the_first_stages_only():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16).eval()
    x = torch.randn(2, 5, 8)
    _, full, _ = rvq(x)
    quantized, two, losses = rvq(x, n_q=2)
    assert two.shape == (2, 2, 5) and losses.shape == (2, 1) and torch.equal(two, full[:2])
    assert torch.equal(quantized, rvq.get_codes_from_indices(full)[:2].sum(0))
    for bad in (0, 5, 1.5, True):
        with pytest.raises(ConfigError):
            rvq(x, n_q=bad)


def test_export_refuses_n_q_where_it_does_not_apply(tmp_path):
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)
    with pytest.raises(UnsupportedOptionError):
        vqdeploy.export_onnx(rvq, tmp_path / "a.onnx", part="decode", n_q=1)
    with pytest.raises(ConfigError):
        vqdeploy.export_onnx(rvq, tmp_path / "b.onnx", part="encode", n_q=3)
    with pytest.raises(UnsupportedOptionError):
        vqdeploy.export_onnx(vqdeploy.VectorQuantize(dim=8, codebook_size=16), tmp_path / "c.onnx", n_q=1)


def test_factorized_rvq_searches_normalised_rows_and_looks_up_raw_codes():
    torch.manual_seed(0)
    rvq = FactorizedResidualVQ(dim=16, num_quantizers=2, codebook_size=32, codebook_dim=[4, 6]).eval()
    x = torch.randn(2, 16, 7)
    _, indices, _ = rvq(x)
    stage = rvq.quantizers[0]
    z_e = stage.in_proj(x)
    rows = torch.nn.functional.normalize(z_e.permute(0, 2, 1).reshape(-1, 4))
    codes = torch.nn.functional.normalize(stage.codebook.weight)
    expected = torch.cdist(rows.double(), codes.double()).argmin(1).reshape(2, 7)
    assert torch.equal(indices[:, 0], expected)
    raw = stage.codebook.weight[indices[:, 0]].transpose(1, 2)
    assert torch.equal(stage.decode(indices[:, 0]), stage.out_proj(raw))
    assert rvq.codebook_dims == [4, 6] and rvq.config["use_cosine_sim"] is True


def test_factorized_rvq_trains_its_codebooks_and_projections_by_gradient():
    torch.manual_seed(0)
    rvq = FactorizedResidualVQ(dim=16, num_quantizers=2, codebook_size=32, quantizer_dropout=0.5).train()
    before = rvq.quantizers[0].codebook.weight.detach().clone()
    optimizer = torch.optim.Adam(rvq.parameters(), lr=1e-2)
    x = torch.randn(4, 16, 8, requires_grad=True)
    quantized, _, loss = rvq(x)
    (loss.sum() + (quantized - x).pow(2).mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # straight-through to the encoder
    assert rvq.quantizers[0].in_proj.parametrizations.weight.original1.grad is not None
    optimizer.step()
    assert not torch.equal(rvq.quantizers[0].codebook.weight, before)


def test_factorized_rvq_strides_and_tuple_layout():
    torch.manual_seed(0)
    rvq = FactorizedResidualVQ(dim=8, num_quantizers=3, codebook_size=16, strides=[4, 2, 1], codes_layout="tuple").eval()
    quantized, indices, _ = rvq(torch.randn(2, 8, 12))
    assert isinstance(indices, tuple) and [t.shape[-1] for t in indices] == [3, 6, 12]
    assert torch.allclose(rvq.get_output_from_indices(indices), quantized, atol=1e-5)
    with pytest.raises(InputShapeError):
        rvq(torch.randn(2, 8, 10))
    with pytest.raises(ConfigError):
        FactorizedResidualVQ(dim=8, num_quantizers=2, codebook_size=16, strides=[2])


def test_split_rvq_halves_see_the_same_input_and_train_by_ema():
    torch.manual_seed(0)
    vq = SplitResidualVQ(dim=16, num_quantizers=3, codebook_size=32, codebook_dim=8).eval()
    x = torch.randn(2, 16, 9)
    quantized, indices, _ = vq(x)
    semantic = vq.semantic(x)
    acoustic = vq.acoustic(x)
    assert torch.equal(indices, torch.cat([semantic[1], acoustic[1]]))
    assert torch.allclose(quantized, semantic[0] + acoustic[0])
    assert torch.allclose(vq.get_output_from_indices(indices), quantized, atol=1e-6)
    assert torch.equal(vq(x, n_q=1)[1], semantic[1])
    before = vq.acoustic.layers[0]._codebook.embed.clone()
    vq.train()(x)
    assert not torch.equal(vq.acoustic.layers[0]._codebook.embed, before)  # EMA update
    with pytest.raises(ConfigError):
        vq(x, n_q=0)


def test_docstring_examples_run():
    import doctest

    import vqdeploy.compat.convert
    import vqdeploy.nn.factorized_vq
    import vqdeploy.nn.split_vq

    for module in (vqdeploy.compat.convert, vqdeploy.nn.factorized_vq, vqdeploy.nn.split_vq):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__
