"""Tampered checkpoints and ONNX metadata: refused by name, never trusted."""

from __future__ import annotations

import json
import math

import onnx
import pytest
import torch

from vqdeploy import (
    ResidualVQ,
    VectorQuantize,
    export_onnx,
    load_quantizer,
    read_metadata,
    runtime,
    save_quantizer,
)
from vqdeploy.errors import (
    CheckpointConfigError,
    CheckpointValuesError,
    MetadataError,
    NotAVQDeployModelError,
)
from vqdeploy.nn.checkpoint import CLASS_KEY, CONFIG_KEY


def _rewrite(path, tensors=None, **metadata_changes):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    metadata.update(metadata_changes)
    save_file(load_file(str(path)) if tensors is None else tensors, str(path), metadata=metadata)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_quantizer(VectorQuantize(dim=8, codebook_size=16).eval(), tmp_path / "vq.safetensors")


def _config(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[CONFIG_KEY])


@pytest.mark.parametrize("change", [
    dict(codebook_size=32), dict(dim=4), dict(no_such_key=1), dict(dim=2**40), dict(codebook_size=2**40),
    dict(codebook_size="16"), dict(dim=-1), dict(decay="x"),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_tampered_checkpoint_configs_are_refused(checkpoint, change):
    _rewrite(checkpoint, **{CONFIG_KEY: json.dumps(_config(checkpoint) | change)})
    with pytest.raises(CheckpointConfigError):  # dim=2**40: refused before anything of that size is allocated
        load_quantizer(checkpoint)


def test_invalid_json_and_changed_class_are_refused(checkpoint):
    good = _config(checkpoint)
    _rewrite(checkpoint, **{CONFIG_KEY: "{not json"})
    with pytest.raises(CheckpointConfigError, match="JSON"):
        load_quantizer(checkpoint)
    _rewrite(checkpoint, **{CONFIG_KEY: json.dumps(good), CLASS_KEY: "ResidualVQ"})
    with pytest.raises(CheckpointConfigError):
        load_quantizer(checkpoint)
    _rewrite(checkpoint, **{CONFIG_KEY: json.dumps([1, 2])})
    with pytest.raises(CheckpointConfigError):
        load_quantizer(checkpoint)


def test_nan_in_a_checkpoint_codebook_is_refused(checkpoint):
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint))
    key = next(k for k in tensors if k.endswith("embed"))
    tensors[key][0, 3, 1] = float("nan")
    _rewrite(checkpoint, tensors=tensors)
    with pytest.raises(CheckpointValuesError, match=key):
        load_quantizer(checkpoint)


def test_a_residual_checkpoint_round_trips(tmp_path):
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True).eval()
    path = save_quantizer(rvq, tmp_path / "rvq.safetensors")
    assert torch.equal(load_quantizer(path).codebooks, rvq.codebooks)


# -- ONNX metadata ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_path(tmp_path_factory):
    torch.manual_seed(0)
    return export_onnx(VectorQuantize(dim=8, codebook_size=16).eval(), tmp_path_factory.mktemp("meta") / "vq.onnx",
                       part="encode")


def _tampered(export_path, tmp_path, **changes):
    model = onnx.load(str(export_path))
    for prop in model.metadata_props:
        key = prop.key.removeprefix("vqdeploy.")
        if key in changes:
            prop.value = changes[key]
    out = tmp_path / "tampered.onnx"
    out.write_bytes(model.SerializeToString())
    return out


@pytest.mark.parametrize("change", [
    dict(codebook_size="abc"), dict(codebook_size="-5"), dict(heads="0"), dict(heads="2"), dict(kind="ResidualVQ"),
    dict(kind="Nope"), dict(codebook_size="32"), dict(dim="4"), dict(part="shred"), dict(config="{bad"),
    dict(config="[1]"), dict(num_quantizers="3"), dict(opset="x"), dict(fused="maybe"), dict(inputs="7"),
    dict(codebook_dim="3"), dict(index_dtype="int8"), dict(metric="dot"),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_tampered_metadata_is_refused(export_path, tmp_path, change):
    bad = _tampered(export_path, tmp_path, **change)
    with pytest.raises(MetadataError):
        read_metadata(bad)
    for backend in ("ort", "torch"):
        with pytest.raises(NotAVQDeployModelError):
            runtime.load(bad, backend=backend)


def test_untouched_metadata_still_reads(export_path):
    info = read_metadata(export_path)
    assert info.codebook_size == 16 and info.heads == 1 and math.isfinite(info.opset)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_codebook_in_an_export_is_refused(export_path, tmp_path, value):
    from onnx import numpy_helper

    from vqdeploy.errors import ModelValuesError

    model = onnx.load(str(export_path))
    codebook = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)  # the largest weight
    values = numpy_helper.to_array(codebook).copy()
    values.reshape(-1)[3] = value
    codebook.CopyFrom(numpy_helper.from_array(values, codebook.name))
    bad = tmp_path / "nan_codebook.onnx"
    bad.write_bytes(model.SerializeToString())
    with pytest.raises(ModelValuesError, match=codebook.name):
        read_metadata(bad)
    for backend in ("ort", "torch"):
        with pytest.raises(ModelValuesError):
            runtime.load(bad, backend=backend)
