"""save_quantizer / load_quantizer round trips."""

from __future__ import annotations

import pytest
import torch

from vqdeploy import ResidualVQ, VectorQuantize, load_quantizer, save_quantizer
from vqdeploy.errors import CheckpointError, OutputExistsError


@pytest.mark.parametrize(
    "module",
    [
        lambda: VectorQuantize(dim=16, codebook_size=32, codebook_dim=8, heads=2, use_cosine_sim=True),
        lambda: ResidualVQ(dim=16, num_quantizers=3, codebook_size=32, shared_codebook=True),
        lambda: ResidualVQ(dim=16, num_quantizers=2, codebook_size=32, decay=0.9, threshold_ema_dead_code=1),
    ],
)
def test_round_trip(module, tmp_path):
    original = module()
    original.train()(torch.randn(2, 20, 16))  # move the EMA state away from its init
    path = save_quantizer(original, tmp_path / "q.safetensors")
    loaded = load_quantizer(path)
    assert type(loaded) is type(original) and loaded.config == original.config
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(3, 4, 16)
    assert torch.equal(loaded(x)[1], original.eval()(x)[1])


def test_refuses_to_overwrite_and_rejects_other_files(tmp_path):
    path = save_quantizer(VectorQuantize(dim=4, codebook_size=4), tmp_path / "q.safetensors")
    with pytest.raises(OutputExistsError):
        save_quantizer(VectorQuantize(dim=4, codebook_size=4), path)
    save_quantizer(VectorQuantize(dim=4, codebook_size=8), path, overwrite=True)
    assert load_quantizer(path).codebook_size == 8
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_quantizer(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantizer(tmp_path / "missing.safetensors")
