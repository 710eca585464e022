"""export_onnx on bad input: typed errors, training mode handled, user files never clobbered."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_cases import cpu_session
from torch import nn

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx, read_metadata
from vqdeploy.errors import (
    ExportError,
    OutputExistsError,
    UninitializedCodebookError,
    UnsupportedOptionError,
    VQDeployError,
)


class Wrapper(nn.Module):
    """A small user model around a quantizer."""

    def __init__(self, quantizer: nn.Module | None = None):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.norm = nn.BatchNorm1d(64)
        self.quantizer = quantizer if quantizer is not None else VectorQuantize(dim=64, codebook_size=16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.proj(x).transpose(1, 2)).transpose(1, 2)
        quantized, indices, _ = self.quantizer(h)
        return quantized, indices


class Broken(Wrapper):
    """Fails inside the export (a shape error after the quantizer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized, _ = super().forward(x)
        return quantized @ torch.ones(3, 3)


def _no_leftovers(directory) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_module_in_training_mode_is_exported_in_eval_mode_and_handed_back_training(tmp_path, digits):
    torch.manual_seed(0)
    vq = VectorQuantize(dim=64, codebook_size=32, decay=0.5).train()
    with torch.no_grad():
        vq(digits[None, :512])  # a training step: the EMA moved the codebook
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    assert vq.training

    path = export_onnx(vq, tmp_path / "vq.onnx", part="quantize")

    assert vq.training, "export must hand the module back in training mode"
    for key, value in vq.state_dict().items():
        assert torch.equal(value, state[key]), f"export changed {key}"
    x = digits[None, 512:1536]
    onnx_vectors, onnx_indices = cpu_session(path).run(None, {"x": x.numpy()})
    vq.eval()
    with torch.no_grad():
        vectors, indices, _ = vq(x)
    np.testing.assert_array_equal(onnx_indices, indices.numpy())
    np.testing.assert_array_equal(onnx_vectors, vectors.numpy())


def test_user_model_keeps_every_submodule_mode(tmp_path):
    """A training model with a frozen (eval) part gets exactly its modes back, submodule by submodule."""
    torch.manual_seed(0)
    model = Wrapper().train()
    model.norm.eval()  # e.g. a frozen normalisation layer
    modes = {name: m.training for name, m in model.named_modules()}

    export_onnx(model, tmp_path / "model.onnx", example_input=torch.randn(2, 5, 64))

    assert {name: m.training for name, m in model.named_modules()} == modes


@pytest.mark.parametrize(
    "make",
    [
        lambda: VectorQuantize(dim=8, codebook_size=4, kmeans_init=True),
        lambda: VectorQuantize(dim=8, codebook_size=4, kmeans_init=True, heads=2, separate_codebook_per_head=True),
        lambda: ResidualVQ(dim=8, num_quantizers=2, codebook_size=4, kmeans_init=True),
    ],
    ids=["vq", "vq-heads", "residual"],
)
def test_uninitialised_kmeans_codebook_is_refused(tmp_path, make):
    module = make()
    with pytest.raises(UninitializedCodebookError, match="kmeans_init"):
        export_onnx(module, tmp_path / "q.onnx", part="encode")
    assert not (tmp_path / "q.onnx").exists()


def test_uninitialised_codebook_inside_a_user_model_is_refused(tmp_path):
    model = Wrapper(VectorQuantize(dim=64, codebook_size=4, kmeans_init=True))
    with pytest.raises(UninitializedCodebookError, match="quantizer"):
        export_onnx(model, tmp_path / "m.onnx", example_input=torch.randn(2, 3, 64))
    assert not (tmp_path / "m.onnx").exists()


def test_existing_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "mine.onnx"
    path.write_bytes(b"the user's own file")
    vq = VectorQuantize(dim=8, codebook_size=4)
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        export_onnx(vq, path, part="encode")
    assert path.read_bytes() == b"the user's own file"
    assert isinstance(OutputExistsError("x"), FileExistsError)
    _no_leftovers(tmp_path)


def test_failed_export_with_overwrite_leaves_the_original_file(tmp_path):
    path = tmp_path / "good.onnx"
    path.write_bytes(b"a good export")
    with pytest.raises(ExportError, match="Broken"):
        export_onnx(Broken(), path, example_input=torch.randn(2, 3, 64), overwrite=True)
    assert path.read_bytes() == b"a good export"
    with pytest.raises(UnsupportedOptionError, match="opset"):
        export_onnx(VectorQuantize(dim=8, codebook_size=4), path, opset=13, overwrite=True)
    assert path.read_bytes() == b"a good export"
    _no_leftovers(tmp_path)


def test_overwrite_replaces_the_file(tmp_path):
    path = tmp_path / "old.onnx"
    path.write_bytes(b"old")
    vq = VectorQuantize(dim=8, codebook_size=4)
    assert export_onnx(vq, path, part="decode", overwrite=True) == path
    assert read_metadata(path).part == "decode"
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("part", ["bogus", "Encode", "", "vectors"])
def test_unknown_part_is_refused(tmp_path, part):
    with pytest.raises(UnsupportedOptionError, match="part must be one of"):
        export_onnx(VectorQuantize(dim=8, codebook_size=4), tmp_path / "q.onnx", part=part)
    assert not (tmp_path / "q.onnx").exists()


def test_part_of_a_user_model_is_refused(tmp_path):
    with pytest.raises(UnsupportedOptionError, match="exported whole"):
        export_onnx(Wrapper(), tmp_path / "m.onnx", part="encode", example_input=torch.randn(2, 3, 64))


def test_model_without_quantizers_is_refused(tmp_path):
    with pytest.raises(UnsupportedOptionError, match="contains no vqdeploy"):
        export_onnx(nn.Sequential(nn.Linear(4, 4)), tmp_path / "m.onnx", example_input=torch.randn(2, 4))
    assert not (tmp_path / "m.onnx").exists()


def test_user_model_without_example_input_is_refused(tmp_path):
    with pytest.raises(UnsupportedOptionError, match="example_input"):
        export_onnx(Wrapper(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_every_refusal_is_a_vqdeploy_error():
    for error in (ExportError, OutputExistsError, UninitializedCodebookError, UnsupportedOptionError):
        assert issubclass(error, VQDeployError)
