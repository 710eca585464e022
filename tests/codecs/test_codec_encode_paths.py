"""Each codec's whole encode path (its own encoder, then its quantizer converted by `vqdeploy.convert`
in one call) exports in one call, runs on ONNX Runtime through `runtime.load`, serves the codec's
own tokens, and passes whole-model `verify`. Random weights from each codec's small config
(codec_models.py); model hubs are unreachable."""

from __future__ import annotations

import pytest
import torch
from codec_cases import get_codec
from codec_parity import stage_tokens
from torch import nn

import vqdeploy
from vqdeploy import export_onnx, read_metadata, runtime, verify

pytestmark = pytest.mark.slow  # one export and one verify per codec

SAMPLES = 1600  # one second at the small configs' 1600 Hz


class EncodePath(nn.Module):
    """audio (batch, 1, SAMPLES) -> the codec's tokens, with the converted quantizer in the middle."""

    def __init__(self, name: str, model: nn.Module):
        super().__init__()
        self.name = name
        self.encoder = model.encoder
        if name in ("encodec", "mimi"):  # transformers' convs keep their padding as tensors: make it Python ints
            from transformers_padding import fix_padding

            fix_padding(self.encoder)
        self.preprocess = model.preprocess if name == "snac" else None  # SNAC pads the clip to its hop
        self.quantizer = vqdeploy.convert(model.quantizer).eval()

    def latents(self, audio: torch.Tensor) -> torch.Tensor:
        latents = self.encoder(audio if self.preprocess is None else self.preprocess(audio))
        return latents.latents if self.name == "mimi" else latents

    def forward(self, audio: torch.Tensor):
        return self.quantizer(self.latents(audio))[1]


def _clips(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(SAMPLES) / SAMPLES
    tone = torch.sin(2 * torch.pi * (40 + 200 * torch.rand(count, 1, 1, generator=generator)) * t)
    return 0.3 * tone + 0.1 * torch.randn(count, 1, SAMPLES, generator=generator)


def _codec_tokens(name: str, model: nn.Module, audio: torch.Tensor):
    with torch.no_grad():
        if name == "encodec":
            return model.encode(audio, bandwidth=max(model.config.target_bandwidths)).audio_codes[0].transpose(0, 1)
        if name == "mimi":
            return model.encode(audio).audio_codes.transpose(0, 1)
        return tuple(model.encode(audio)) if name == "snac" else model.encode(audio).audio_codes


@pytest.fixture(scope="module", params=["encodec", "dac", "snac", "mimi"])
def exported(request, tmp_path_factory):
    name = request.param
    codec = get_codec(name)
    path_module = EncodePath(name, codec.model).eval()
    path = tmp_path_factory.mktemp(name) / f"{name}_encode.onnx"
    export_onnx(path_module, path, example_input=_clips(2, seed=0), dynamic_shapes=({0: "batch"},),
                input_names=["audio"], output_names=_token_outputs(path_module))
    return name, codec, path_module, path


def test_served_tokens_are_the_codecs_own(exported):
    name, codec, path_module, path = exported
    audio = _clips(3, seed=1)
    with runtime.load(path, backend="ort") as served, torch.no_grad():
        outputs = [torch.as_tensor(o) for o in served.run(audio.numpy()).values()]
        eager = path_module(audio)
    quantizer = path_module.quantizer
    theirs = stage_tokens(quantizer, _codec_tokens(name, codec.model, audio))
    ours = stage_tokens(quantizer, eager)
    served_stages = stage_tokens(quantizer, outputs[0] if len(outputs) == 1 else tuple(outputs))
    # the converted quantizer on the codec's own latents gives the codec's own tokens, stage by stage
    assert len(ours) == len(theirs) == len(served_stages) == quantizer.num_quantizers
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    # ORT's encoder rounds otherwise than torch's (row drift): verify judges each served token on the
    # backend's own rows; here the served tokens are the eager ones almost everywhere
    same = sum(int((a == b).sum()) for a, b in zip(served_stages, ours, strict=True))
    assert same / sum(t.numel() for t in ours) > 0.95


def test_metadata_names_the_quantizer_and_every_search(exported):
    name, codec, path_module, path = exported
    info = read_metadata(path)
    assert info.kind == "model" and info.inputs == ["audio"] and info.outputs == _token_outputs(path_module)
    stages = path_module.quantizer.num_quantizers
    assert len(info.searches) == stages


def test_whole_model_verify_passes(exported):
    name, codec, path_module, path = exported
    report = verify(path_module, path, backend="ort", inputs=[_clips(2, seed=2)])
    assert report.passed and report.violations == 0, report.table()
    assert report.tokens == 2 * _frames(path_module)


def _token_outputs(path_module: EncodePath) -> list[str]:
    """One output of tokens, or one per stage where the codec's tokens are a tuple (SNAC)."""
    stages = path_module.quantizer.num_quantizers
    return [f"tokens{s}" for s in range(stages)] if path_module.name == "snac" else ["tokens"]


def _frames(path_module: EncodePath) -> int:
    """Tokens per clip over all stages (stages of a strided codec have fewer frames)."""
    with torch.no_grad():
        return sum(t.numel() for t in stage_tokens(path_module.quantizer, path_module(_clips(1, seed=0))))


def test_a_tampered_codebook_fails_whole_model_verify(exported, tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    name, codec, path_module, path = exported
    model = onnx.load(str(path))
    books = [i for i in model.graph.initializer if "codebook" in i.name or "embed" in i.name]
    assert books, [i.name for i in model.graph.initializer]
    target = books[0]  # the first stage's: its codes make every later stage's residual
    values = numpy_helper.to_array(target).copy()
    values += np.float32(0.05) * np.abs(values).mean() * np.random.default_rng(0).standard_normal(values.shape).astype(np.float32)
    target.CopyFrom(numpy_helper.from_array(values, target.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    report = verify(path_module, tampered, backend="ort", inputs=[_clips(2, seed=2)])
    assert not report.passed and report.violations > 0, report.table()
