"""The Triton model repository: config.pbtxt parsed by Triton's own ModelConfig schema (tritonclient),
and the token-major graph run in ONNX Runtime, here and in the version Triton's backend ships.

Triton itself does not run here: what its dynamic batcher does (concatenate requests along the
batch axis) is reproduced by concatenating token rows, and what its onnxruntime backend does with
the file (load it in its own ONNX Runtime) by tools/triton_ort_check.py in a separate venv.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from serving_cases import CODEBOOK_SIZE, DIM, LAYOUTS

import vqdeploy
from vqdeploy import runtime
from vqdeploy.cli import main
from vqdeploy.errors import NotAVQDeployModelError, OutputExistsError, UnsupportedOptionError
from vqdeploy.runtime.base import default_chunk_size
from vqdeploy.serving.ray_serve import indices_of_rows, rows_to_input
from vqdeploy.serving.triton import TRITON_ORT_VERSION, write_triton_repository

ROOT = Path(__file__).resolve().parents[2]


def _pb2():
    return pytest.importorskip("tritonclient.grpc.model_config_pb2",
                               reason="tritonclient is not installed (pip install 'vqdeploy[triton]')")


def _model_config(path: Path):
    """config.pbtxt parsed as Triton's ModelConfig (text_format rejects unknown fields and bad values)."""
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), _pb2().ModelConfig())


def _session(model_dir: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(model_dir / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _direct(path: Path, rows: np.ndarray) -> np.ndarray:
    """What vqdeploy's own runtime gives for the rows as one sequence, token-major: (T[, H]) or (T, Q)."""
    with runtime.load(path, backend="ort") as quantizer:
        indices = indices_of_rows(quantizer.info, quantizer.encode(rows_to_input(quantizer.info, rows)), rows.shape[0])
        return indices.T if quantizer.info.kind == "ResidualVQ" else indices


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_config_parses_as_triton_model_config(encode_exports, tmp_path, layout, gpu):
    path = encode_exports(layout)
    target = write_triton_repository(path, tmp_path / "repo", name="vq", max_batch_size=4096, instances=3, gpu=gpu,
                                     intra_op_threads=2, max_queue_delay_us=250)
    config = _model_config(target / "config.pbtxt")
    assert (config.name, config.backend, config.max_batch_size) == ("vq", "onnxruntime", 4096)
    (inp,) = config.input
    assert (inp.name, _pb2().DataType.Name(inp.data_type), list(inp.dims)) == ("x", "TYPE_FP32", [DIM])
    (out,) = config.output
    width = {"residual": 3, "heads": 2}.get(layout)
    assert out.name == "indices" and _pb2().DataType.Name(out.data_type) == "TYPE_INT64"
    if width is None:  # one index per token: dims [1] presented, reshaped to the graph's (N,)
        assert list(out.dims) == [1] and out.HasField("reshape") and list(out.reshape.shape) == []
    else:
        assert list(out.dims) == [width] and not out.HasField("reshape")
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 250
    (group,) = config.instance_group
    assert group.count == 3 and _pb2().ModelInstanceGroup.Kind.Name(group.kind) == ("KIND_GPU" if gpu else "KIND_CPU")
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    if gpu:
        (cuda,) = accelerators
        assert cuda.name == "cuda" and dict(cuda.parameters) == {"use_tf32": "0"}
    else:
        assert len(accelerators) == 0
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert params == {"intra_op_thread_count": "2", "inter_op_thread_count": "1"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_token_major_graph_gives_vqdeploy_tokens_for_joined_requests(encode_exports, tmp_path, layout):
    path = encode_exports(layout)
    target = write_triton_repository(path, tmp_path / "repo")
    session = _session(target)
    assert [i.shape for i in session.get_inputs()] == [["tokens", DIM]]
    rng = np.random.default_rng(1)
    requests = [rng.standard_normal((n, DIM)).astype(np.float32) for n in (1, 7, 300)]
    # Triton's dynamic batcher concatenates requests along the batch (token) axis and splits the result.
    joined = session.run(["indices"], {"x": np.concatenate(requests)})[0]
    offsets = np.cumsum([0] + [len(r) for r in requests])
    for rows, start, stop in zip(requests, offsets[:-1], offsets[1:], strict=True):
        alone = session.run(["indices"], {"x": rows})[0]
        np.testing.assert_array_equal(joined[start:stop], alone)
        np.testing.assert_array_equal(alone, _direct(path, rows))


def test_codebook_rows_come_back_as_their_own_index(tmp_path):
    """A check that does not lean on vqdeploy's runtime: each code, sent as a token, is its own nearest."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    module = vqdeploy.VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE).eval()
    path = vqdeploy.export_onnx(module, tmp_path / "vq.onnx", part="encode")
    codes = module._codebook.embed.detach().reshape(-1, DIM).numpy().astype(np.float32)
    got = _session(write_triton_repository(path, tmp_path / "repo")).run(["indices"], {"x": codes})[0]
    np.testing.assert_array_equal(got, np.arange(CODEBOOK_SIZE))


def test_the_written_graph_keeps_the_fused_op_and_says_it_is_token_major(encode_exports, tmp_path):
    target = write_triton_repository(encode_exports("plain"), tmp_path / "repo")
    proto = onnx.load(str(target / "1" / "model.onnx"))
    assert any(n.op_type == "NearestCode" and n.domain == "vqdeploy" for n in proto.graph.node)
    info = vqdeploy.read_metadata(proto)
    assert (info.input_layout, info.inputs, info.outputs) == ("n d", ["x"], ["indices"])
    assert proto.ir_version <= 10  # ONNX Runtime >= 1.16 reads IR 10; Triton's ships >= 1.24


def test_defaults_name_and_batch_size_from_the_export(encode_exports, tmp_path):
    path = encode_exports("plain")
    target = write_triton_repository(path, tmp_path / "repo")
    assert target == tmp_path / "repo" / "plain"
    config = _model_config(target / "config.pbtxt")
    assert config.max_batch_size == default_chunk_size(vqdeploy.read_metadata(path))


def test_an_existing_model_is_kept_without_force(encode_exports, tmp_path):
    plain, residual = encode_exports("plain"), encode_exports("residual")
    repo = tmp_path / "repo"
    write_triton_repository(plain, repo, name="vq")
    write_triton_repository(residual, repo, name="other")
    before = (repo / "vq" / "1" / "model.onnx").read_bytes()
    with pytest.raises(OutputExistsError, match="vq already exists; pass force=True"):
        write_triton_repository(residual, repo, name="vq")
    assert (repo / "vq" / "1" / "model.onnx").read_bytes() == before
    write_triton_repository(residual, repo, name="vq", force=True)
    assert (repo / "vq" / "1" / "model.onnx").read_bytes() != before
    assert sorted(p.name for p in repo.iterdir()) == ["other", "vq"]  # no staging folders left, other kept


def test_bad_inputs_are_refused(encode_exports, tmp_path):
    path = encode_exports("plain")
    decode = vqdeploy.export_onnx(LAYOUTS["plain"]().eval(), tmp_path / "decode.onnx", part="decode")
    with pytest.raises(UnsupportedOptionError, match="part 'decode'.*part='encode'"):
        write_triton_repository(decode, tmp_path / "repo")
    foreign = tmp_path / "foreign.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["a"], ["b"])], "g",
                                   [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(NotAVQDeployModelError):
        write_triton_repository(foreign, tmp_path / "repo")
    for options, message in (({"max_batch_size": 0}, "max_batch_size must be >= 1"),
                             ({"instances": 0}, "instances must be >= 1"),
                             ({"intra_op_threads": -1}, "intra_op_threads must be >= 0"),
                             ({"name": "a/b"}, "model name")):
        with pytest.raises(UnsupportedOptionError, match=message):
            write_triton_repository(path, tmp_path / "repo", **options)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputExistsError, match="not a directory"):
        write_triton_repository(path, tmp_path / "file")
    assert not (tmp_path / "repo").exists()


def test_cli_triton_repo(encode_exports, tmp_path, capsys):
    path = encode_exports("heads")
    repo = tmp_path / "models"
    assert main(["triton-repo", str(path), "-o", str(repo), "--gpu", "--instances", "2", "--max-batch-size", "512",
                 "--threads", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    config = _model_config(repo / "heads" / "config.pbtxt")
    assert (config.max_batch_size, config.instance_group[0].count) == (512, 2)
    assert dict(config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters) == {"use_tf32": "0"}
    assert main(["triton-repo", str(path), "-o", str(repo)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vqdeploy: error: ") and "already exists" in err and "--force" in err
    assert main(["triton-repo", str(path), "-o", str(repo), "--force"]) == 0
    assert _model_config(repo / "heads" / "config.pbtxt").max_batch_size == default_chunk_size(vqdeploy.read_metadata(path))
    assert main(["triton-repo", str(tmp_path / "missing.onnx"), "-o", str(repo)]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_the_graph_runs_in_the_onnx_runtime_triton_ships(encode_exports, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-ort") / "repo"
    target = write_triton_repository(encode_exports("residual"), repo)  # the (N, Q) output, 3 searches
    venv_dir = tmp_path_factory.getbasetemp() / f"ort-{TRITON_ORT_VERSION}"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_ort_check.py"), str(target), "--venv",
                           str(venv_dir), "--tokens", "5000"], capture_output=True, text=True, timeout=1200)
    if done.returncode == 3:
        pytest.skip(f"onnxruntime=={TRITON_ORT_VERSION} could not be installed: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f'"old_ort": "{TRITON_ORT_VERSION}"' in done.stdout and '"differing": 0' in done.stdout
