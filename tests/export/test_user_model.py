"""A user's model with a quantizer inside (conv encoder -> VectorQuantize -> conv/linear decoder on
the 8x8 digits) exports whole and runs in ONNX Runtime at parity with eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_cases import cpu_session
from torch import nn

from vqdeploy import VectorQuantize, export_onnx, read_metadata


class DigitsAutoencoder(nn.Module):
    """8x8 digit image -> 4x4 grid of 32-dim latents -> VQ tokens -> reconstructed 64 pixels."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1)
        )
        self.vq = VectorQuantize(dim=32, codebook_size=32, accept_image_fmap=True, kmeans_init=True)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 64)
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized, indices, _ = self.vq(self.encoder(images))
        return self.decoder(quantized), indices


def _images(digits: torch.Tensor) -> torch.Tensor:
    return digits.reshape(-1, 1, 8, 8)


@pytest.fixture(scope="module")
def trained(digits) -> DigitsAutoencoder:
    """The codebook k-means initialised on the encoded digits (one training forward), then eval mode."""
    torch.manual_seed(7)
    model = DigitsAutoencoder().train()
    with torch.no_grad():
        model(_images(digits[:1024]))
    return model.eval()


@pytest.fixture(scope="module")
def exported(trained, digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("user-model") / "autoencoder.onnx"
    export_onnx(trained, path, example_input=_images(digits[:2]))
    return path


@pytest.mark.parametrize("batch", [1, 7, 1797])
def test_user_model_matches_eager_on_digits(trained, exported, digits, batch):
    images = _images(digits[:batch])
    with torch.no_grad():
        reconstruction, indices = trained(images)
    session = cpu_session(exported)
    outputs = session.run(None, {session.get_inputs()[0].name: images.numpy()})

    assert len(outputs) == 2
    onnx_reconstruction, onnx_indices = outputs
    assert onnx_indices.dtype == np.int64 and onnx_indices.shape == (batch, 4, 4)
    np.testing.assert_array_equal(onnx_indices, indices.numpy())
    torch.testing.assert_close(torch.from_numpy(onnx_reconstruction), reconstruction, atol=1e-5, rtol=1e-5)


def test_user_model_uses_the_codebook_and_is_described(exported, trained, digits):
    with torch.no_grad():
        _, indices = trained(_images(digits))
    assert indices.unique().numel() > 8  # a real, used codebook, not one code for everything

    info = read_metadata(exported)
    assert info.kind == "model" and info.part == "model"
    assert info.input_layout == "model"
    assert (info.dim, info.codebook_size, info.heads, info.num_quantizers) == (32, 32, 1, 1)
    assert [q["path"] for q in info.quantizers] == ["vq"]
    assert info.quantizers[0]["input_layout"] == "b d h w"
    assert info.index_dtype == "int64"


def test_user_model_has_a_fused_search_node(exported):
    import onnx

    from vqdeploy.export.functions import nearest_code_nodes

    model = onnx.load(str(exported))
    assert len(nearest_code_nodes(model)) == 1
    assert [f.name for f in model.functions] == ["NearestCode"]
