"""vqdeploy.compat.vector_quantize_pytorch: 1.32's documented usage, its layouts, strict index checks,
and that modules with 1.32's conventions still save, export, run in ONNX Runtime and verify."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vqdeploy
from vqdeploy.compat.vector_quantize_pytorch import ResidualVQ, VectorQuantize
from vqdeploy.errors import ConfigError, InputShapeError, UnsupportedOptionError, VQDeployError

reference = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is a test dependency")


def _same_layout(ours: tuple, theirs: tuple) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)


# 1.32's README usage (sizes scaled down), each run against the reference and against the compat namespace (same call).
USAGE = {
    "basic": (lambda lib: lib.VectorQuantize(dim=64, codebook_size=128, decay=0.8, commitment_weight=1.0),
              lambda: torch.randn(1, 256, 64), {}),
    "residual": (lambda lib: lib.ResidualVQ(dim=64, num_quantizers=8, codebook_size=128),
                 lambda: torch.randn(1, 256, 64), {}),
    "residual_all_codes": (lambda lib: lib.ResidualVQ(dim=64, num_quantizers=8, codebook_size=128),
                           lambda: torch.randn(1, 256, 64), dict(return_all_codes=True)),
    "residual_kmeans": (lambda lib: lib.ResidualVQ(dim=64, codebook_size=128, num_quantizers=4, kmeans_init=True,
                                                   kmeans_iters=10), lambda: torch.randn(1, 256, 64), {}),
    "shared_codebook": (lambda lib: lib.ResidualVQ(dim=64, codebook_size=128, num_quantizers=4,
                                                   shared_codebook=True), lambda: torch.randn(1, 256, 64), {}),
    "lower_codebook_dim": (lambda lib: lib.VectorQuantize(dim=64, codebook_size=128, codebook_dim=16),
                           lambda: torch.randn(1, 256, 64), {}),
    "cosine": (lambda lib: lib.VectorQuantize(dim=64, codebook_size=128, codebook_dim=16, use_cosine_sim=True),
               lambda: torch.randn(1, 256, 64), {}),
    "dead_codes": (lambda lib: lib.VectorQuantize(dim=64, codebook_size=128, threshold_ema_dead_code=2),
                   lambda: torch.randn(1, 256, 64), {}),
    "multihead": (lambda lib: lib.VectorQuantize(dim=64, codebook_dim=32, heads=8, separate_codebook_per_head=True,
                                                 codebook_size=128), lambda: torch.randn(1, 256, 64), {}),
    "image_fmap": (lambda lib: lib.VectorQuantize(dim=64, codebook_size=128, accept_image_fmap=True),
                   lambda: torch.randn(1, 64, 8, 8), {}),
    "channel_first": (lambda lib: lib.VectorQuantize(dim=64, codebook_size=128, channel_last=False),
                      lambda: torch.randn(1, 64, 256), {}),
    "residual_dropout": (lambda lib: lib.ResidualVQ(dim=64, num_quantizers=8, codebook_size=128,
                                                    quantize_dropout=True), lambda: torch.randn(1, 256, 64), {}),
}


@pytest.mark.parametrize("case", USAGE)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_documented_usage_gives_the_reference_layouts(case, mode):
    build, make_input, forward = USAGE[case]
    x = make_input()
    ref, ours = build(reference), build(__import__("vqdeploy.compat.vector_quantize_pytorch", fromlist=["x"]))
    if mode == "eval":
        ref.train()(x, **forward), ours.train()(x, **forward)  # k-means codebooks need one training batch
    ref_out = getattr(ref, mode)()(x, **forward)
    out = getattr(ours, mode)()(x, **forward)
    _same_layout(out, ref_out)
    with torch.no_grad():
        indices = out[1]
        decoded = ours.get_output_from_indices(indices)
    assert decoded.shape == x.shape
    if mode == "eval":
        torch.testing.assert_close(decoded, out[0], rtol=1e-6, atol=1e-6)


def test_seed_defaults_are_unchanged():
    q, i, loss = vqdeploy.ResidualVQ(dim=32, num_quantizers=4, codebook_size=16)(torch.randn(2, 10, 32))
    assert i.shape == (4, 2, 10) and loss.shape == (4, 1)
    _, _, loss = vqdeploy.VectorQuantize(dim=32, codebook_size=16)(torch.randn(2, 10, 32))
    assert loss.shape == (1,)
    assert not vqdeploy.VectorQuantize(dim=32, codebook_size=16).rotation_trick


def test_a_configuration_of_the_native_classes_not_a_copy():
    vq = VectorQuantize(256, 512)  # 1.32's positional order: dim, codebook_size, codebook_dim, heads...
    assert type(vq) is vqdeploy.VectorQuantize and vq.config["conventions"] == "vector_quantize_pytorch"
    assert isinstance(vq, VectorQuantize) and not isinstance(vqdeploy.VectorQuantize(256, 512), VectorQuantize)
    assert vq.rotation_trick  # 1.32's default for dim > 1
    assert not VectorQuantize(1, 8).rotation_trick
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=4)
    assert type(rvq) is vqdeploy.ResidualVQ and isinstance(rvq, ResidualVQ)
    assert VectorQuantize(8, 4, 2, 4).heads == 4


def test_commitment_alias_and_argument_errors():
    assert VectorQuantize(dim=8, codebook_size=4, commitment=0.5).commitment == 0.5
    with pytest.raises(ConfigError, match="commitment"):
        VectorQuantize(dim=8, codebook_size=4, commitment=0.5, commitment_weight=1.0)
    for build in (lambda: VectorQuantize(dim=8, codebook_size=4, no_such_option=1),
                  lambda: ResidualVQ(dim=8, num_quantizers=2, codebook_size=4, no_such_option=1)):
        with pytest.raises(UnsupportedOptionError, match="no_such_option"):
            build()
    with pytest.raises(VQDeployError):
        VectorQuantize(dim=8)  # missing codebook_size: a typed error too, never a bare TypeError


def test_distributed_options_at_their_defaults_are_accepted():
    VectorQuantize(dim=8, codebook_size=4, sync_codebook=None, sync_kmeans=True)
    VectorQuantize(dim=8, codebook_size=4, sync_codebook=False)
    ResidualVQ(dim=8, num_quantizers=2, codebook_size=4, sync_codebook=False)
    from vqdeploy.nn.conventions import native_accepts

    if not native_accepts(vqdeploy.VectorQuantize, "sync_codebook"):
        with pytest.raises(UnsupportedOptionError, match="sync_codebook"):
            VectorQuantize(dim=8, codebook_size=4, sync_codebook=True)


# -- strict index layouts ----------------------------------------------------------------------------------
def test_indices_of_the_other_layout_are_refused():
    x = torch.randn(2, 10, 8)
    compat, seed = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16).eval(), vqdeploy.ResidualVQ(
        dim=8, num_quantizers=4, codebook_size=16).eval()
    compat_indices, seed_indices = compat(x)[1], seed(x)[1]
    assert compat_indices.shape == (2, 10, 4) and seed_indices.shape == (4, 2, 10)
    for module, wrong in ((compat, seed_indices), (seed, compat_indices)):
        for method in (module.get_output_from_indices, module.get_codes_from_indices):
            with pytest.raises(InputShapeError, match="quantizers"):
                method(wrong)
    with pytest.raises(InputShapeError):  # fewer stages only with quantize_dropout, as in 1.32
        compat.get_output_from_indices(compat_indices[..., :2])


def test_batch_seq_quantizers_equal_follows_the_module_convention():
    """b = n = q: no shape check can tell the layouts apart; the module's convention decides (1.32's here)."""
    ref = reference.ResidualVQ(dim=8, num_quantizers=3, codebook_size=16).eval()
    ours = vqdeploy.ResidualVQ.from_vector_quantize_pytorch(ref)
    indices = torch.randint(0, 16, (3, 3, 3))
    torch.testing.assert_close(ours.get_output_from_indices(indices), ref.get_output_from_indices(indices))
    torch.testing.assert_close(ours.get_codes_from_indices(indices), ref.get_codes_from_indices(indices))
    seed = vqdeploy.ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, conventions="seed")
    seed.load_state_dict(ours.state_dict())
    torch.testing.assert_close(seed.get_output_from_indices(indices.permute(2, 0, 1)),
                               ours.get_output_from_indices(indices))


def test_unknown_conventions_are_refused():
    with pytest.raises(ConfigError, match="conventions"):
        vqdeploy.VectorQuantize(dim=8, codebook_size=4, conventions="other")


# -- checkpoints and exports keep the conventions -------------------------------------------------------
def test_checkpoint_round_trip_keeps_the_conventions(tmp_path):
    rvq = vqdeploy.ResidualVQ.from_vector_quantize_pytorch(reference.ResidualVQ(dim=8, num_quantizers=2,
                                                                                codebook_size=16))
    loaded = vqdeploy.load_quantizer(vqdeploy.save_quantizer(rvq, tmp_path / "rvq.safetensors"))
    assert isinstance(loaded, ResidualVQ) and loaded.config == rvq.config


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["VectorQuantize", "ResidualVQ", "layernorm"])
def test_converted_module_exports_and_runs_in_onnx_runtime(kind, tmp_path, digits):
    from vqdeploy import runtime

    if kind == "ResidualVQ":
        ref = reference.ResidualVQ(dim=64, num_quantizers=3, codebook_size=32, codebook_dim=16)
    elif kind == "layernorm":
        ref = reference.VectorQuantize(dim=64, codebook_size=32, codebook_dim=16, layernorm_after_project_in=True)
    else:
        ref = reference.VectorQuantize(dim=64, codebook_size=32, heads=2, separate_codebook_per_head=True)
    ref.train()(digits[:256].reshape(4, 64, 64))  # some EMA updates, so the codes are not the random init
    module = vqdeploy.VectorQuantize if kind != "ResidualVQ" else vqdeploy.ResidualVQ
    ours = module.from_vector_quantize_pytorch(ref.eval()).eval()
    x = digits[:512].reshape(4, 128, 64)
    with torch.no_grad():
        want_vectors, want_indices, _ = ref(x)
    quantize = vqdeploy.export_onnx(ours, tmp_path / "quantize.onnx", part="quantize")
    decode = vqdeploy.export_onnx(ours, tmp_path / "decode.onnx", part="decode")
    with runtime.load(quantize, backend="ort") as session:
        vectors, indices = session.quantize(x.numpy())
    assert indices.shape == tuple(want_indices.shape)  # the module's (1.32's) layout
    np.testing.assert_array_equal(indices, want_indices.numpy())
    np.testing.assert_allclose(vectors, want_vectors.numpy(), rtol=1e-5, atol=1e-5)
    with runtime.load(decode, backend="ort") as session:
        np.testing.assert_allclose(session.decode(want_indices.numpy()), want_vectors.numpy(), rtol=1e-5, atol=1e-5)
    with runtime.load(quantize, backend="torch") as session:
        assert torch.equal(session.encode(x), want_indices)
    report = vqdeploy.verify(ours, quantize, backend="ort", num_samples=256)
    assert report.passed, report.table()


def test_user_model_with_a_converted_quantizer_exports_whole(tmp_path, digits):
    from torch import nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(64, 32)
            self.vq = reference.ResidualVQ(dim=32, num_quantizers=2, codebook_size=16)

        def forward(self, x):
            quantized, indices, _ = self.vq(self.encoder(x))
            return quantized, indices[..., -1]  # written against 1.32's (b, n, q)

    model = Model().eval()
    model.vq = vqdeploy.ResidualVQ.from_vector_quantize_pytorch(model.vq).eval()
    x = digits[:128].reshape(2, 64, 64)
    path = vqdeploy.export_onnx(model, tmp_path / "model.onnx", example_input=x)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want_vectors, want_last = model(x)
    np.testing.assert_array_equal(outputs[1], want_last.numpy())
    np.testing.assert_allclose(outputs[0], want_vectors.numpy(), rtol=1e-5, atol=1e-5)


def test_readme_migration_table_is_the_option_table():
    from pathlib import Path

    from vqdeploy.nn.conventions import migration_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert migration_table() in readme
