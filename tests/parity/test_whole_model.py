"""Whole models: export controls, runtime.load's WholeModel on ort and torch, and the whole-model
parity certificate (rows + tokens per search), with faults in the file that each must fail."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from whole_model_faults import (
    drop_stage,
    drop_stage_from_tokens,
    nudge_code,
    nudge_weight,
    round_to_float16,
    tampered,
)

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx, read_metadata, runtime, verify
from vqdeploy.errors import InputShapeError, NotAVQDeployModelError, UnsupportedOptionError
from vqdeploy.export.metadata import write_metadata
from vqdeploy.parity import ModelParityReport

FRAME = 256  # samples per clip: the fixed frame of the export


class TinyCodec(nn.Module):
    """audio (b, 1, FRAME) -> conv encoder -> ResidualVQ (4 stages, 64 codes) -> (vectors, tokens)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(1, 16, 4, stride=4), nn.GELU(), nn.Conv1d(16, 16, 3, padding=1))
        self.rvq = ResidualVQ(dim=16, num_quantizers=4, codebook_size=64, kmeans_init=True)

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized, indices, _ = self.rvq(self.encoder(audio).transpose(1, 2))
        return quantized, indices


class TwoQuantizers(nn.Module):
    """Two VectorQuantize in one model: one with separate codebooks per head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.coarse = VectorQuantize(dim=8, codebook_size=16)
        self.fine = VectorQuantize(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True, codebook_dim=4)

    def forward(self, x: torch.Tensor):
        _, a, _ = self.coarse(self.proj(x))
        _, b, _ = self.fine(x)
        return a, b


@pytest.fixture(scope="module")
def codec() -> TinyCodec:
    torch.manual_seed(3)
    model = TinyCodec().train()
    with torch.no_grad():
        model(torch.randn(64, 1, FRAME))  # k-means initialises every stage's codebook
    return model.eval()


@pytest.fixture(scope="module")
def exported(codec, tmp_path_factory):
    path = tmp_path_factory.mktemp("whole") / "codec.onnx"
    return export_onnx(codec, path, example_input=torch.randn(2, 1, FRAME), dynamic_shapes=({0: "batch"},))


# -- export -----------------------------------------------------------------------------------------
def test_metadata_describes_every_quantizer_and_search(exported):
    info = read_metadata(exported)
    assert info.kind == "model" and info.part == "model"
    assert info.inputs == ["input"] and info.outputs == ["output", "tokens"]
    assert info.input_shapes == [["batch", 1, FRAME]]  # a dynamic batch, a fixed frame
    (quantizer,) = info.quantizers
    assert (quantizer["path"], quantizer["kind"], quantizer["stages"]) == ("rvq", "ResidualVQ", 4)
    assert (quantizer["codebook_size"], quantizer["dim"], quantizer["codebook_dim"]) == (64, 16, 16)
    assert quantizer["tokens_output"] == "tokens" and quantizer["tokens_axes"] == [0, 1, 2]
    assert [s["id"] for s in info.searches] == [f"rvq.stage{s}" for s in range(4)]
    assert all(s["codebook_size"] == 64 and s["dim"] == 16 and s["rows_output"] == f"search.{s['id']}.rows"
               for s in info.searches)
    # the top-level fields older readers know keep their meaning
    assert (info.num_quantizers, info.codebook_size, info.dim) == (4, 64, 16)


def test_old_readers_fields_and_old_files(exported, tmp_path):
    model = onnx.load(str(exported))
    props = {p.key: p.value for p in model.metadata_props}
    for key in ("vqdeploy.kind", "vqdeploy.num_quantizers", "vqdeploy.quantizers", "vqdeploy.outputs"):
        assert key in props
    # a file written before these fields existed still loads
    old = [p for p in model.metadata_props
           if p.key not in ("vqdeploy.searches", "vqdeploy.input_shapes", "vqdeploy.example_shapes",
                            "vqdeploy.verification_outputs")]
    del model.metadata_props[:]
    model.metadata_props.extend(old)
    onnx.save(model, str(tmp_path / "old.onnx"))
    info = read_metadata(tmp_path / "old.onnx")
    assert info.searches == [] and info.input_shapes == []
    with runtime.load(tmp_path / "old.onnx", backend="ort") as served:
        assert set(served.run(np.zeros((1, 1, FRAME), np.float32))) == {"output", "tokens"}


def test_verification_outputs_are_graph_outputs(codec, tmp_path):
    path = export_onnx(codec, tmp_path / "v.onnx", example_input=torch.randn(2, 1, FRAME), verification_outputs=True,
                       dynamic_shapes=False)
    info = read_metadata(path)
    assert info.verification_outputs
    assert info.outputs == ["output", "tokens"] + [f"search.rvq.stage{s}.{w}" for s in range(4) for w in ("rows", "tokens")]
    assert info.input_shapes == [[2, 1, FRAME]]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, FRAME)
    out = dict(zip(info.outputs, session.run(None, {"input": x.numpy()}), strict=True))
    with torch.no_grad():
        rows = codec.rvq.search_rows(codec.encoder(x).transpose(1, 2), torch.from_numpy(out["tokens"]))
    for s in range(4):
        assert out[f"search.rvq.stage{s}.rows"].shape == (2 * FRAME // 4, 16)
        np.testing.assert_allclose(out[f"search.rvq.stage{s}.rows"], rows[s].numpy(), atol=1e-5)
        np.testing.assert_array_equal(out[f"search.rvq.stage{s}.tokens"], out["tokens"][s].reshape(-1))
    assert verify(codec, path, inputs=[x]).passed


def test_output_names_can_be_chosen(codec, tmp_path):
    path = export_onnx(codec, tmp_path / "n.onnx", example_input=torch.randn(2, 1, FRAME),
                       input_names=["audio"], output_names=["latents", "codes"])
    info = read_metadata(path)
    assert info.inputs == ["audio"] and info.outputs == ["latents", "codes"]
    assert info.quantizers[0]["tokens_output"] == "codes"


def test_several_quantizers_and_heads(tmp_path):
    torch.manual_seed(0)
    model = TwoQuantizers().eval()
    path = export_onnx(model, tmp_path / "two.onnx", example_input=torch.randn(2, 5, 8))
    info = read_metadata(path)
    assert info.outputs == ["coarse.tokens", "fine.tokens"]
    assert [s["id"] for s in info.searches] == ["coarse", "fine.head0", "fine.head1"]
    assert [(q["path"], q["stages"], q["tokens_axes"]) for q in info.quantizers] == [
        ("coarse", 1, [0, 1]), ("fine", 2, [0, 1, 2])]
    with runtime.load(path, backend="ort") as served:
        with pytest.raises(UnsupportedOptionError, match="one tokens output"):
            served.encode(np.zeros((1, 3, 8), np.float32))
    report = verify(model, path)
    assert report.passed and [s.search for s in report.searches] == ["coarse", "fine.head0", "fine.head1"]


def test_bare_quantizer_refuses_whole_model_options(tmp_path):
    with pytest.raises(UnsupportedOptionError, match="whole model"):
        export_onnx(VectorQuantize(dim=8, codebook_size=16), tmp_path / "q.onnx", output_names=["a"])


# -- runtime ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_runtime_runs_the_whole_model(codec, exported, backend):
    x = torch.randn(3, 1, FRAME)
    with torch.no_grad():
        vectors, tokens = codec(x)
    options = {"model": codec} if backend == "torch" else {}
    with runtime.load(exported, backend=backend, **options) as served:
        assert served.backend == backend and served.outputs == ["output", "tokens"]
        out = served.run({"input": x.numpy()})
        assert isinstance(out["tokens"], np.ndarray) and out["tokens"].shape == (4, 3, FRAME // 4)
        np.testing.assert_array_equal(out["tokens"], tokens.numpy())  # no near-ties on these inputs
        np.testing.assert_allclose(out["output"], vectors.numpy(), atol=1e-5)
        encoded = served.encode(x)
        assert isinstance(encoded, torch.Tensor) and torch.equal(encoded, tokens)
        with pytest.raises(InputShapeError, match="fixed size 256"):
            served.run(np.zeros((1, 1, FRAME + 4), np.float32))
        with pytest.raises(UnsupportedOptionError, match="run"):
            served.decode(tokens)


def test_torch_backend_needs_the_module_and_uses_the_files_weights(codec, exported, tmp_path):
    with pytest.raises(UnsupportedOptionError, match="model=module"):
        runtime.load(exported, backend="torch")
    with pytest.raises(UnsupportedOptionError, match="bare"):
        runtime.load(export_onnx(codec.rvq, tmp_path / "rvq.onnx", part="encode"), backend="torch", model=codec)
    nudged = tampered(exported, nudge_weight("encoder.0.weight", 0.5), tmp_path / "nudged.onnx")
    x = torch.randn(2, 1, FRAME)
    with torch.no_grad():
        eager_vectors, _ = codec(x)
    with runtime.load(nudged, backend="torch", model=codec) as served:
        assert not torch.allclose(served.run(x)["output"], eager_vectors, atol=1e-4)  # the file's weight ran


# -- verify -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_clean_export_passes(codec, exported, backend):
    report = verify(codec, exported, backend=backend)
    assert isinstance(report, ModelParityReport) and report.passed, report.table()
    assert report.tokens == 4 * 2 * 2 * FRAME // 4  # 4 stages x 2 inputs x 2 clips x 64 frames
    assert all(s.tolerance > 0 and s.max_drift <= s.tolerance for s in report.searches)
    if backend == "torch":
        assert all(s.max_drift == 0 for s in report.searches)  # the same code on the same weights
    table = report.table()
    assert "PASS" in table and "tolerance = 16 x" in table
    data = json.loads(report.to_json())
    assert data["passed"] and len(data["searches"]) == 4 and "tie_crossings" in data


FAULTS = {
    "nudged encoder weight": (nudge_weight("encoder.2.weight", 1e-3), "rows"),
    "nudged code": (nudge_code("rvq.layers.0._codebook.embed", code=0), "any"),
    "dropped stage": (drop_stage(1), "rows"),
    "float16 encoder": (round_to_float16("encoder."), "rows"),
    "tokens output loses a stage": (drop_stage_from_tokens("tokens", 2), "problems"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_fails(codec, exported, fault, tmp_path):
    edit, check = FAULTS[fault]
    path = tampered(exported, edit, tmp_path / "fault.onnx")
    report = verify(codec, path, backend="ort")
    assert not report.passed, report.table()
    if check == "rows":
        assert report.rows_over_tolerance > 0, report.table()
        assert "the model computes other rows" in report.table()
    elif check == "problems":
        assert report.problems and "other tokens" in report.table()
    assert "FAIL" in report.table()


@pytest.mark.parametrize("fault", ["nudged encoder weight", "nudged code", "float16 encoder"])
def test_weight_fault_fails_on_torch_backend(codec, exported, fault, tmp_path):
    edit, _ = FAULTS[fault]
    report = verify(codec, tampered(exported, edit, tmp_path / "fault.onnx"), backend="torch")
    assert not report.passed, report.table()


def test_nudged_code_is_a_token_violation_on_the_backend_rows(codec, exported, tmp_path):
    # the code the eager model uses most, moved: rows near it are served another code
    x = torch.randn(2, 1, FRAME)
    with torch.no_grad():
        _, tokens = codec(x)
    code = int(torch.bincount(tokens[0].reshape(-1)).argmax())
    path = tampered(exported, nudge_code("rvq.layers.0._codebook.embed", code=code, amount=0.5), tmp_path / "c.onnx")
    report = verify(codec, path, inputs=[x])
    assert report.searches[0].tokens.violations > 0, report.table()
    assert report.searches[0].rows_over_tolerance == 0  # stage 0 sees the encoder's rows, untouched


def test_verify_refuses_files_that_do_not_describe_their_searches(codec, exported, tmp_path):
    info = read_metadata(exported)
    model = onnx.load(str(exported))
    from dataclasses import replace

    write_metadata(model, replace(info, searches=[]))
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(NotAVQDeployModelError, match="export it again"):
        verify(codec, tmp_path / "bare.onnx")


# -- the CLI ------------------------------------------------------------------------------------------
def test_cli_verifies_a_whole_model_from_a_factory_or_a_saved_module(codec, exported, tmp_path, capsys):
    from vqdeploy.cli import main

    saved = tmp_path / "codec.pt"
    torch.save(codec, saved)
    factory = tmp_path / "mycodec.py"
    factory.write_text(f"import torch\n\n\ndef build():\n    return torch.load({str(saved)!r}, weights_only=False)\n")
    clips = tmp_path / "clips.npy"
    np.save(clips, np.random.default_rng(0).standard_normal((2, 1, FRAME)).astype(np.float32))

    assert main(["verify", f"{factory}:build", str(exported), "--inputs", str(clips),
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "rvq.stage3" in out and "tie crossings" in out
    assert json.loads((tmp_path / "r.json").read_text())["passed"]
    assert main(["verify", str(saved), str(exported), "--backend", "torch"]) == 0

    nudged = tampered(exported, nudge_weight("encoder.2.weight", 1e-3), tmp_path / "nudged.onnx")
    assert main(["verify", str(saved), str(nudged)]) == 1
    assert "row(s) beyond tolerance" in capsys.readouterr().err
    assert main(["verify", "no_such_module_xyz:build", str(exported)]) != 0
    assert "cannot import" in capsys.readouterr().err


def test_unfused_whole_model_verifies_from_the_named_values(codec, tmp_path):
    path = export_onnx(codec, tmp_path / "plain.onnx", example_input=torch.randn(2, 1, FRAME), fused=False)
    assert not any(n.domain == "vqdeploy" for n in onnx.load(str(path)).graph.node)
    with runtime.load(path) as served:  # auto: ort for a whole model
        assert served.backend == "ort"
    report = verify(codec, path)
    assert report.passed and report.tokens == 4 * 2 * 2 * FRAME // 4, report.table()
    bad = tampered(path, nudge_weight("encoder.2.weight", 1e-3), tmp_path / "bad.onnx")
    assert verify(codec, bad).rows_over_tolerance > 0
