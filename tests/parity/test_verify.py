"""verify: untampered exports pass; real faults are caught and named; exact midpoints are ties.

The full fault-injection suite (every kind of tampering, every backend) is test_faults.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx, save_quantizer
from vqdeploy.parity import default_inputs, verify


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A VectorQuantize and a ResidualVQ trained briefly on digits, their checkpoints and exports."""
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0)
    digits = digits - digits.mean(0)  # zero-mean, as encoder latents usually are
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("verify")
    out = {}
    for name, module in {
        "vq": VectorQuantize(dim=64, codebook_size=64, kmeans_init=True),
        "rvq": ResidualVQ(dim=64, num_quantizers=3, codebook_size=32, kmeans_init=True),
    }.items():
        module.train()
        for _ in range(10):
            module(digits[torch.randint(0, len(digits), (512,))][None])
        module.eval()
        out[name] = dict(
            module=module,
            checkpoint=save_quantizer(module, folder / f"{name}.safetensors"),
            encode=export_onnx(module, folder / f"{name}_encode.onnx", part="encode"),
            quantize=export_onnx(module, folder / f"{name}_quantize.onnx", part="quantize"),
            unfused=export_onnx(module, folder / f"{name}_unfused.onnx", part="encode", fused=False),
        )
    return out


def _tampered(path, tmp_path, edit):
    model = onnx.load(str(path))
    edit(model)
    target = tmp_path / f"tampered_{path.name}"
    onnx.save(model, str(target))
    return target


def _edit_initializer(name, change):
    def edit(model):
        for init in model.graph.initializer:
            if init.name == name:
                init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init).copy()), name))
                return
        raise KeyError(name)

    return edit


@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("name", ["vq", "rvq"])
@pytest.mark.parametrize("graph", ["encode", "quantize", "unfused"])
def test_untampered_exports_pass(trained, name, backend, graph):
    case = trained[name]
    report = verify(case["module"], case[graph], backend=backend, num_samples=512)
    assert report.passed, report.table()
    assert report.violations == 0 and report.tokens > 0
    assert report.identical + report.certified_ties == report.tokens


def test_exact_midpoints_are_certified_ties_not_violations(trained):
    case = trained["vq"]
    inputs = default_inputs(case["module"], num_samples=512)
    exact_ties = inputs[2]  # midpoints between each code and its nearest neighbour
    # ONNX Runtime's ArgMin alone (no re-check): its GEMM rounds differently, some midpoints flip.
    report = verify(case["module"], case["encode"], backend="ort", inputs=[exact_ties], recheck=False)
    assert report.passed, report.table()
    assert report.criterion == "certified ties" and report.certified_ties > 0
    # With the re-check (the default): the exact argmin, as eager; held to identity.
    report = verify(case["module"], case["encode"], backend="ort", inputs=[exact_ties])
    assert report.passed, report.table()
    assert report.criterion == "identical" and report.identical == report.tokens


def test_nudged_codebook_row_is_caught(trained, tmp_path):
    case = trained["vq"]
    codebook = case["module"].codebook.detach()
    scale = float(codebook.std())

    x = default_inputs(case["module"], num_samples=512)[0]
    busiest = int(case["module"](x)[1].flatten().mode().values)

    def nudge(embed):
        embed[0, busiest] += 0.5 * scale
        return embed

    bad = _tampered(case["encode"], tmp_path, _edit_initializer("quantizer._codebook.embed", nudge))
    report = verify(case["module"], bad, backend="ort", num_samples=512)
    assert not report.passed
    assert report.stages[0].violations > 0
    assert "FAIL" in report.table()


def test_dropped_residual_stage_is_named(trained, tmp_path):
    case = trained["rvq"]
    bad = _tampered(case["encode"], tmp_path, _edit_initializer("quantizer.layers.1._codebook.embed", np.zeros_like))
    report = verify(case["module"], bad, backend="ort", num_samples=512)
    assert not report.passed
    assert report.stages[0].violations == 0
    assert report.stages[1].stage == "stage 1" and report.stages[1].violations > 0
    assert "stage 1" in report.table()


def test_float16_codebook_is_caught(trained, tmp_path):
    case = trained["vq"]
    cast = _edit_initializer("quantizer._codebook.embed", lambda e: e.astype(np.float16).astype(np.float32))
    bad = _tampered(case["encode"], tmp_path, cast)
    report = verify(case["module"], bad, backend="ort", num_samples=1024)
    assert report.violations > 0, report.table()


def test_polygraphy_comparator_agrees_with_verify(trained, tmp_path):
    """Polygraphy runs the file in a plain ORT session (no re-check): compare with verify on the same path."""
    from vqdeploy.parity.polygraphy_adapter import compare_with_polygraphy

    case = trained["rvq"]
    inputs = default_inputs(case["module"], num_samples=256)
    ok, stages = compare_with_polygraphy(case["module"], case["quantize"], inputs)
    report = verify(case["module"], case["quantize"], backend="ort", inputs=inputs, recheck=False)
    assert ok and report.passed
    assert [s.violations for s in stages] == [s.violations for s in report.stages]

    bad = _tampered(case["quantize"], tmp_path, _edit_initializer("quantizer.layers.1._codebook.embed", np.zeros_like))
    ok, stages = compare_with_polygraphy(case["module"], bad, inputs)
    report = verify(case["module"], bad, backend="ort", inputs=inputs, recheck=False)
    assert not ok and not report.passed
    assert [s.violations for s in stages] == [s.violations for s in report.stages]


def test_cli_exit_codes_and_json(trained, tmp_path):
    case = trained["vq"]
    good_json = tmp_path / "good.json"
    result = subprocess.run(
        [sys.executable, "-m", "vqdeploy", "verify", str(case["checkpoint"]), str(case["encode"]), "--json", str(good_json)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(good_json.read_text())["passed"] is True

    bad = _tampered(case["encode"], tmp_path, _edit_initializer("quantizer._codebook.embed", lambda e: e * 1.1))
    bad_json = tmp_path / "bad.json"
    result = subprocess.run(
        [sys.executable, "-m", "vqdeploy", "verify", str(case["checkpoint"]), str(bad), "--json", str(bad_json)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    data = json.loads(bad_json.read_text())
    assert data["passed"] is False and data["violations"] > 0


def test_vectors_of_codes_the_graph_computes_are_held_to_the_float32_tolerance(digits):
    """affine_param codes come from a Sqrt and a Div each runtime rounds its own way: a vector one
    ulp off passes there, and only there (a stored codebook is held bit for bit)."""
    from vqdeploy.compat.vector_quantize_pytorch import VectorQuantize as CompatVQ
    from vqdeploy.parity.classify import check_vectors, codes_computed_in_graph
    from vqdeploy.parity.report import VectorReport

    torch.manual_seed(0)
    x = digits[:512].reshape(8, 64, 64)
    affine = CompatVQ(dim=64, codebook_size=16, affine_param=True)
    affine.train()(x)
    plain = VectorQuantize(dim=64, codebook_size=16)
    for module in (affine.eval(), plain.eval()):
        with torch.no_grad():
            quantized, indices, _ = module(x)
        one_ulp_off = torch.nextafter(quantized, torch.full_like(quantized, float("inf")))
        report = VectorReport()
        check_vectors(module, one_ulp_off, indices, report)
        assert report.rows == indices.numel()
        assert codes_computed_in_graph(module) is (module is affine)
        assert (report.violations == 0) is (module is affine), report
        far = VectorReport()
        check_vectors(module, quantized + 1e-3, indices, far)  # beyond the tolerance everywhere
        assert far.violations == far.rows
