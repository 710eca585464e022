"""Fault injection: verify must fail every export that serves other tokens or vectors.

Each fault tampers the exported *file* (initializers or graph), never the eager side, and runs
verify with its default inputs on ONNX Runtime, the torch backend (which rebuilds the quantizer
from the file's weights; only for faults in the weights) and the Polygraphy comparator. Clean
exports, exact midpoints and duplicate codes (certified ties) must still pass.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from vqdeploy import ResidualVQ, VectorQuantize, export_onnx
from vqdeploy.export.functions import inline_function
from vqdeploy.parity import verify

pytestmark = pytest.mark.slow  # ~4 min on 2 cores: 15 exports and ~90 verify runs

NUM_SAMPLES = 384

CONFIGS: dict[str, Callable[[], torch.nn.Module]] = {
    "vq": lambda: VectorQuantize(dim=64, codebook_size=48, kmeans_init=True),
    "heads": lambda: VectorQuantize(dim=64, codebook_size=48, codebook_dim=32, heads=2, kmeans_init=True),
    "separate": lambda: VectorQuantize(
        dim=64, codebook_size=48, codebook_dim=32, heads=2, separate_codebook_per_head=True, kmeans_init=True
    ),
    "projected": lambda: VectorQuantize(dim=64, codebook_size=48, codebook_dim=16, kmeans_init=True),
    "rvq": lambda: ResidualVQ(dim=64, num_quantizers=3, codebook_size=32, kmeans_init=True),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, dict]:
    """Each configuration trained briefly on scikit-learn's digits, exported in every part."""
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0)
    digits = digits - digits.mean(0)
    folder = tmp_path_factory.mktemp("faults")
    out = {}
    for name, build in CONFIGS.items():
        torch.manual_seed(0)
        module = build().train()
        with torch.no_grad():
            for _ in range(8):
                module(digits[torch.randint(0, len(digits), (512,))][None])
        module.eval()
        out[name] = {"module": module}
        for part in ("encode", "quantize", "decode"):
            out[name][part] = export_onnx(module, folder / f"{name}_{part}.onnx", part=part)
    return out


# -- tampering -----------------------------------------------------------------------------------
def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _edit_initializer(name: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        for init in model.graph.initializer:
            if init.name == name:
                init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init).copy()), name))
                return
        raise KeyError(f"{name} not among {[i.name for i in model.graph.initializer]}")

    return edit


def _embed(name: str, stage: int) -> str:
    return f"quantizer.layers.{stage}._codebook.embed" if name == "rvq" else "quantizer._codebook.embed"


def nudge_code(stage: int = 0, head: int = 0, code: int = 3, amount: float = 0.5):
    def change(embed: np.ndarray) -> np.ndarray:
        embed[head, code] += amount * embed.std()
        return embed

    return change


def swap_codes(a: int = 2, b: int = 5):
    def change(embed: np.ndarray) -> np.ndarray:
        embed[0, [a, b]] = embed[0, [b, a]]
        return embed

    return change


def to_float16(embed: np.ndarray) -> np.ndarray:
    return embed.astype(np.float16).astype(np.float32)


def _rewire(op_type: str, number: int) -> Callable[[onnx.ModelProto], None]:
    """Replace the ``number``-th ``op_type`` node of the main graph by Identity of its first input."""

    def edit(model: onnx.ModelProto) -> None:
        nodes = [n for n in model.graph.node if n.op_type == op_type]
        node = nodes[number]
        node.op_type, node.domain = "Identity", ""
        del node.input[1:]

    return edit


def skip_stage(stage: int) -> Callable[[onnx.ModelProto], None]:
    """Drop a residual stage from the chain: its residual update and its vector sum become identities."""
    drop_residual = _rewire("Sub", stage)

    def edit(model: onnx.ModelProto) -> None:
        drop_residual(model)
        adds = [n for n in model.graph.node if n.op_type == "Add"]
        if adds:
            _rewire("Add", stage + 1)(model)  # Add 0 is zeros + stage 0

    return edit


def drop_stage_output(stage: int) -> Callable[[onnx.ModelProto], None]:
    """The indices output loses one stage (a file that serves fewer stages than the model has)."""

    def edit(model: onnx.ModelProto) -> None:
        concat = next(n for n in model.graph.node if "indices" in n.output)
        del concat.input[stage]

    return edit


def duplicate_stage(source: int, target: int) -> Callable[[onnx.ModelProto], None]:
    """Stage ``target`` searches (and decodes with) stage ``source``'s codebook."""

    def edit(model: onnx.ModelProto) -> None:
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                if name == _embed("rvq", target):
                    node.input[k] = _embed("rvq", source)

    return edit


def tf32_like_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline the search and round the MatMul inputs to a 10-bit mantissa (as TF32 does)."""
    model = inline_function(model)
    nodes = list(model.graph.node)
    out = []
    for number, node in enumerate(nodes):
        if node.op_type == "MatMul":
            for k, name in enumerate(list(node.input)):
                half, back = f"tf32_{number}_{k}_half", f"tf32_{number}_{k}"
                out += [
                    helper.make_node("Cast", [name], [half], to=onnx.TensorProto.FLOAT16),
                    helper.make_node("Cast", [half], [back], to=onnx.TensorProto.FLOAT),
                ]
                node.input[k] = back
        out.append(node)
    del model.graph.node[:]
    model.graph.node.extend(out)
    return model


# (config, part, edit of the file, in the weights only?) -> verify must fail
FAULTS: dict[str, tuple[str, str, Callable, bool]] = {
    "vq: nudged code": ("vq", "encode", _edit_initializer(_embed("vq", 0), nudge_code()), True),
    "vq: nudged code, quantize": ("vq", "quantize", _edit_initializer(_embed("vq", 0), nudge_code(amount=0.05)), True),
    "vq: swapped codes": ("vq", "encode", _edit_initializer(_embed("vq", 0), swap_codes()), True),
    "vq: float16 codebook": ("vq", "encode", _edit_initializer(_embed("vq", 0), to_float16), True),
    "vq: tf32-like matmul": ("vq", "encode", tf32_like_matmul, False),
    "heads: nudged code": ("heads", "encode", _edit_initializer(_embed("heads", 0), nudge_code()), True),
    "separate: nudged code of head 1": ("separate", "encode", _edit_initializer(_embed("separate", 0), nudge_code(head=1)), True),
    "projected: project_in weight": ("projected", "encode", _edit_initializer("quantizer.project_in.weight", lambda w: w * 1.01), True),
    "projected: project_in bias": ("projected", "encode", _edit_initializer("quantizer.project_in.bias", lambda b: b + 0.05), True),
    "projected: project_out weight": ("projected", "quantize", _edit_initializer("quantizer.project_out.weight", lambda w: w * 1.001), True),
    "projected: project_out bias": ("projected", "decode", _edit_initializer("quantizer.project_out.bias", lambda b: b + 1e-3), True),
    "rvq: nudged code, stage 0": ("rvq", "encode", _edit_initializer(_embed("rvq", 0), nudge_code()), True),
    "rvq: nudged code, stage 1": ("rvq", "encode", _edit_initializer(_embed("rvq", 1), nudge_code()), True),
    "rvq: nudged code, stage 2": ("rvq", "quantize", _edit_initializer(_embed("rvq", 2), nudge_code()), True),
    "rvq: swapped codes, stage 1": ("rvq", "encode", _edit_initializer(_embed("rvq", 1), swap_codes()), True),
    "rvq: float16 codebook, stage 1": ("rvq", "encode", _edit_initializer(_embed("rvq", 1), to_float16), True),
    "rvq: stage 1 skipped": ("rvq", "quantize", skip_stage(1), False),
    "rvq: stage 2 missing from the output": ("rvq", "encode", drop_stage_output(2), False),
    "rvq: stage 2 duplicates stage 1": ("rvq", "quantize", duplicate_stage(1, 2), False),
    "rvq: tf32-like matmul": ("rvq", "encode", tf32_like_matmul, False),
    "vq: decode codebook differs": ("vq", "decode", _edit_initializer(_embed("vq", 0), nudge_code(amount=1e-3)), True),
    "rvq: decode codebook differs, stage 2": ("rvq", "decode", _edit_initializer(_embed("rvq", 2), nudge_code(amount=1e-3)), True),
}


def _tampered(trained, fault: str, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    name, part, edit, _ = FAULTS[fault]
    model = onnx.load(str(trained[name][part]))
    edited = edit(model)
    return trained[name]["module"], _save(edited if edited is not None else model, tmp_path / "tampered.onnx")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_fails_on_ort(trained, fault, tmp_path):
    module, path = _tampered(trained, fault, tmp_path)
    report = verify(module, path, backend="ort", num_samples=NUM_SAMPLES)
    assert not report.passed, f"{fault} passed:\n{report.table()}"
    assert "FAIL" in report.table()


@pytest.mark.parametrize("fault", [f for f, (*_, weights_only) in FAULTS.items() if weights_only])
def test_fault_fails_on_torch_backend(trained, fault, tmp_path):
    module, path = _tampered(trained, fault, tmp_path)
    report = verify(module, path, backend="torch", num_samples=NUM_SAMPLES)
    assert not report.passed, f"{fault} passed:\n{report.table()}"


def test_reproduction_names_stage_2_and_the_vectors(trained, tmp_path):
    """A nudged code of the last stage: a token violation at stage 2 and, where the file serves
    that code, a vector violation; earlier stages stay clean."""
    module, path = _tampered(trained, "rvq: nudged code, stage 2", tmp_path)
    report = verify(module, path, backend="ort", num_samples=NUM_SAMPLES)
    assert report.stages[2].stage == "stage 2" and report.stages[2].violations > 0
    assert report.stages[0].violations == 0 and report.stages[1].violations == 0
    assert report.vectors.violations > 0
    assert "violation: stage 2" in report.table() and "violation: vectors" in report.table()


def test_missing_stage_is_a_named_layout_violation(trained, tmp_path):
    module, path = _tampered(trained, "rvq: stage 2 missing from the output", tmp_path)
    report = verify(module, path, backend="ort", num_samples=NUM_SAMPLES)
    assert report.problems and len(report.problems) == len(set(report.problems))  # each named once
    assert all("(2, 1," in p and "does not match its metadata" in p for p in report.problems)
    assert all(stage.violations == stage.tokens > 0 for stage in report.stages)
    assert "violation: the ort backend returned" in report.table()


@pytest.mark.parametrize(
    "fault", ["vq: nudged code", "rvq: nudged code, stage 2", "rvq: stage 1 skipped", "projected: project_out weight"]
)
def test_fault_fails_in_polygraphy(trained, fault, tmp_path):
    from vqdeploy.parity import default_inputs
    from vqdeploy.parity.polygraphy_adapter import compare_with_polygraphy

    module, path = _tampered(trained, fault, tmp_path)
    ok, _ = compare_with_polygraphy(module, path, default_inputs(module, num_samples=NUM_SAMPLES))
    assert not ok, fault


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("part", ["encode", "quantize", "decode"])
def test_clean_exports_pass_every_backend(trained, name, part):
    for backend in ("ort", "torch"):
        report = verify(trained[name]["module"], trained[name][part], backend=backend, num_samples=NUM_SAMPLES)
        assert report.passed, report.table()
        assert report.tokens > 0 or part == "decode"
        if backend == "torch":  # vqdeploy's exact search on both sides: identity, not ties
            assert report.criterion == "identical" and report.certified_ties == 0
        if part != "encode":
            assert report.vectors.rows > 0 and report.vectors.violations == 0


def test_probes_exercise_every_code_of_every_stage(trained):
    report = verify(trained["rvq"]["module"], trained["rvq"]["encode"], backend="ort", num_samples=NUM_SAMPLES)
    assert [s.codes_exercised for s in report.stages] == [32, 32, 32]


def test_duplicate_codes_and_exact_midpoints_pass(trained, tmp_path):
    """Exact ties in the eager model itself (a duplicated code, midpoints) are certified, not violations."""
    module = CONFIGS["rvq"]()
    module.load_state_dict(trained["rvq"]["module"].state_dict())
    with torch.no_grad():
        for layer in module.layers:
            layer._codebook.embed[0, 7] = layer._codebook.embed[0, 3]
    module.eval()
    path = export_onnx(module, tmp_path / "dup.onnx", part="quantize")
    for backend in ("ort", "torch"):
        report = verify(module, path, backend=backend, num_samples=NUM_SAMPLES)
        assert report.passed, report.table()
