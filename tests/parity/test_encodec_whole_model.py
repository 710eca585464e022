"""A whole codec encode path: transformers' EnCodec (random weights from a small 24 kHz config)
with its quantizer converted by `vqdeploy.convert` (one call), exported in one call with a fixed one-second frame,
run through runtime.load on ort and torch, and verified end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from encodec_path import BANDWIDTH, SAMPLING_RATE, EncodecEncodePath, small_encodec  # noqa: E402
from whole_model_faults import nudge_weight, round_to_float16, tampered  # noqa: E402

from vqdeploy import export_onnx, read_metadata, runtime, verify  # noqa: E402
from vqdeploy.ops import certify  # noqa: E402

pytestmark = pytest.mark.slow  # one EnCodec export (~40 s on 2 cores) and six verify runs

STAGES = 8


@pytest.fixture(scope="module")
def encodec():
    return small_encodec()


@pytest.fixture(scope="module")
def encode_path(encodec) -> EncodecEncodePath:
    return EncodecEncodePath(encodec).eval()


@pytest.fixture(scope="module")
def exported(encode_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("encodec") / "encodec_encode.onnx"
    clip = torch.randn(2, 1, SAMPLING_RATE) * 0.1
    return export_onnx(encode_path, path, example_input=clip, dynamic_shapes=({0: "batch"},),
                       input_names=["audio"])


def _clips(count: int, seed: int) -> torch.Tensor:
    """Speech-like test signals: a few harmonics with a slow envelope, plus noise, at 0.1 scale."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(SAMPLING_RATE) / SAMPLING_RATE
    base = 80 + 200 * torch.rand(count, 1, 1, generator=generator)
    tone = sum(torch.sin(2 * torch.pi * base * h * t) / h for h in range(1, 5))
    envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t)
    return 0.1 * (tone * envelope + 0.3 * torch.randn(count, 1, SAMPLING_RATE, generator=generator))


def test_the_mapping_serves_encodecs_own_tokens(encodec, encode_path):
    clips = _clips(2, seed=1)
    with torch.no_grad():
        theirs = encodec.encode(clips, bandwidth=BANDWIDTH).audio_codes[0]  # (batch, stages, frames)
        ours = encode_path(clips)
        rows = encode_path.quantizer.search_rows(encode_path.encoder(clips))[0]
    assert ours.shape == theirs.shape == (2, STAGES, 75)
    # stage 0 searches the same encoder rows: any difference is a float32 tie of EnCodec's own formula
    differ = ours[:, 0].reshape(-1) != theirs[:, 0].reshape(-1)
    codebook = encode_path.quantizer.layers[0].codebook
    assert bool(certify(rows[differ], codebook, theirs[:, 0].reshape(-1)[differ]).certified.all())
    assert float((ours == theirs).float().mean()) > 0.95


def test_exports_in_one_call_with_a_fixed_frame(exported):
    info = read_metadata(exported)
    assert info.inputs == ["audio"] and info.outputs == ["tokens"]
    assert info.input_shapes == [["batch", 1, SAMPLING_RATE]]
    (quantizer,) = info.quantizers
    assert (quantizer["kind"], quantizer["stages"], quantizer["codebook_size"], quantizer["dim"]) == (
        "ResidualVQ", STAGES, 1024, 32)
    assert quantizer["tokens_output"] == "tokens" and quantizer["tokens_axes"] == [1, 0, 2]
    assert len(info.searches) == STAGES


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_runs_through_runtime_load(encode_path, exported, backend):
    clips = _clips(3, seed=2)
    with torch.no_grad():
        eager = encode_path(clips)
    options = {"model": encode_path} if backend == "torch" else {}
    with runtime.load(exported, backend=backend, **options) as served:
        tokens = served.encode(clips.numpy())
    assert isinstance(tokens, np.ndarray) and tokens.shape == (3, STAGES, 75)
    assert float((torch.from_numpy(tokens) == eager).float().mean()) > 0.99


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_verify_passes_with_row_drift_and_tie_crossings_reported(encode_path, exported, backend):
    report = verify(encode_path, exported, backend=backend, inputs=[_clips(2, seed=3), _clips(2, seed=4)])
    print(report.table())
    assert report.passed and report.violations == 0, report.table()
    assert report.tokens == STAGES * 4 * 75
    assert all(0 < s.tolerance and s.max_drift <= s.tolerance for s in report.searches)
    if backend == "ort":
        assert any(s.max_drift > 0 for s in report.searches)  # ORT's encoder rounds otherwise than eager
    assert report.differ_from_eager == sum(s.tie_crossings + s.after_earlier_stage for s in report.searches)
    assert "tie crossings" in report.table()


@pytest.mark.parametrize("fault", ["nudged encoder weight", "float16 encoder"])
def test_encoder_faults_fail_the_rows_check(encode_path, exported, fault, tmp_path):
    edit = (nudge_weight("encoder.layers.15.conv.parametrizations.weight.original0", 1e-3) if fault.startswith("nudged")
            else round_to_float16("encoder."))
    report = verify(encode_path, tampered(exported, edit, tmp_path / "fault.onnx"), inputs=[_clips(2, seed=3)])
    assert not report.passed and report.rows_over_tolerance > 0, report.table()
