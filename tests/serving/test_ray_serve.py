"""Ray Serve: merged requests give each request the tokens of a direct `Quantizer.encode` of its rows.

The cluster tests start one private local Ray for the module (2 CPUs, no dashboard, usage stats
off, files under the test's temp dir; `@serve.batch` needs a real replica, Ray 2.60's local testing
mode has none) and call the deployment through its handle, and over Serve's HTTP proxy on
127.0.0.1 from concurrent threads, every call with a timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from serving_cases import DIM, LAYOUTS

from vqdeploy import runtime
from vqdeploy.errors import InputShapeError, NonFiniteInputError, UnsupportedOptionError

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'vqdeploy[serve]')")

from vqdeploy.serving.ray_serve import (  # noqa: E402
    NPY_CONTENT_TYPE,
    QuantizerDeployment,
    build_app,
    check_rows,
    indices_of_rows,
    local_serve,
    rows_to_input,
)

REQUEST_TIMEOUT_S = 60


def _requests(count: int, seed: int, max_tokens: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(1, max_tokens + 1)), DIM)).astype(np.float32) for _ in range(count)]


def _direct(path: Path, rows: list[np.ndarray]) -> list[np.ndarray]:
    """Each request encoded alone, in this process, by the plain Quantizer API."""
    with runtime.load(path, backend="ort") as quantizer:
        return [indices_of_rows(quantizer.info, quantizer.encode(rows_to_input(quantizer.info, r)), r.shape[0])
                for r in rows]


# -- without a cluster -----------------------------------------------------------------------------------------
def test_bad_requests_raise_typed_errors(encode_exports):
    info = QuantizerDeployment(encode_exports("plain"), intra_op_num_threads=1).info
    with pytest.raises(InputShapeError, match=rf"\(tokens >= 1, {DIM}\), got \(3, {DIM + 1}\)"):
        check_rows(info, np.zeros((3, DIM + 1), np.float32))
    with pytest.raises(InputShapeError, match="got \\(0, "):
        check_rows(info, np.zeros((0, DIM), np.float32))
    with pytest.raises(InputShapeError, match="got \\(5,\\)"):
        check_rows(info, np.zeros(5, np.float32))
    with pytest.raises(NonFiniteInputError):
        check_rows(info, np.full((2, DIM), np.nan, np.float32))
    with pytest.raises(InputShapeError, match="array of numbers"):
        check_rows(info, [["a"] * DIM])
    assert check_rows(info, [[0.5] * DIM]).dtype == np.float32


def test_a_decode_export_is_refused(tmp_path):
    import vqdeploy

    path = vqdeploy.export_onnx(LAYOUTS["plain"]().eval(), tmp_path / "decode.onnx", part="decode")
    with pytest.raises(UnsupportedOptionError, match="part 'decode'.*part='encode'"):
        QuantizerDeployment(path)


# -- over HTTP, on a local Ray --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serve_url(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    # Ray's socket paths (temp dir + ~62 characters) must stay under ~107: the test's own temp dir
    # when it is short (pytest's default is), else a short one of the system's, removed after.
    own = len(str(base)) < 40
    temp_dir = base / "ray" if own else Path(tempfile.mkdtemp(prefix="vqray"))
    try:
        with local_serve(temp_dir, num_cpus=2) as url:
            yield url
    finally:
        if not own:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _post(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@contextlib.contextmanager
def _deployed(path: Path, route: str, **options):
    """An application at `route` for the test's duration (deleted after: the 2 CPUs hold few replicas)."""
    from ray import serve

    name = route.strip("/")
    app = build_app(path, intra_op_num_threads=1, ray_actor_options={"num_cpus": 0.5}, **options)
    handle = serve.run(app, name=name, route_prefix=route)
    try:
        yield handle
    finally:
        serve.delete(name)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["heads", "channel_first", "image"])  # plain and residual: over HTTP below
def test_merged_handle_calls_split_back_to_direct_tokens(serve_url, encode_exports, layout):
    path = encode_exports(layout)
    requests = _requests(24, seed=len(layout))
    with _deployed(path, f"/{layout}", max_batch_tokens=4096, batch_wait_timeout_s=0.05) as handle:
        responses = [handle.encode.remote(r) for r in requests]  # all in flight at once
        served = [r.result(timeout_s=REQUEST_TIMEOUT_S) for r in responses]
        stats = handle.stats.remote().result(timeout_s=REQUEST_TIMEOUT_S)
    for got, want in zip(served, _direct(path, requests), strict=True):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert stats["requests"] == 24
    assert stats["batch_calls"] < 24  # requests were merged, not run one by one


@pytest.mark.slow
def test_requests_above_the_token_cap_run_alone(serve_url, encode_exports):
    path = encode_exports("plain")
    requests = _requests(6, seed=3, max_tokens=100)  # some above 32 tokens, some below
    with _deployed(path, "/capped", max_batch_tokens=32, batch_wait_timeout_s=0.01) as handle:
        served = [r.result(timeout_s=REQUEST_TIMEOUT_S) for r in [handle.encode.remote(x) for x in requests]]
    for got, want in zip(served, _direct(path, requests), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_concurrent_http_clients_get_direct_tokens(serve_url, encode_exports):
    path = encode_exports("plain")
    threads, per_thread = 8, 20
    requests = _requests(threads * per_thread, seed=11)

    def client(chunk: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for rows in chunk:
            status, body = _post(f"{serve_url}/plain", json.dumps({"x": rows.tolist()}).encode(), "application/json")
            assert status == 200, body
            out.append(np.asarray(json.loads(body)["indices"]))
        return out

    chunks = [requests[i::threads] for i in range(threads)]
    with _deployed(path, "/plain", batch_wait_timeout_s=0.01) as handle, ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(client, chunk) for chunk in chunks]
        results = [f.result(timeout=300) for f in futures]
        stats = handle.stats.remote().result(timeout_s=REQUEST_TIMEOUT_S)
    expected = _direct(path, requests)
    for i, chunk_results in enumerate(results):
        for j, got in enumerate(chunk_results):
            np.testing.assert_array_equal(got, expected[i + j * threads])
    assert stats["requests"] == threads * per_thread
    assert stats["batch_calls"] < stats["requests"]  # concurrent requests shared backend calls


@pytest.mark.slow
def test_http_npy_residual_and_bad_input(serve_url, encode_exports):
    path = encode_exports("residual")
    requests = _requests(24, seed=5)

    def call(rows: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        np.save(buffer, rows)
        status, body = _post(f"{serve_url}/residual", buffer.getvalue(), NPY_CONTENT_TYPE)
        assert status == 200, body
        return np.load(io.BytesIO(body))

    with _deployed(path, "/residual"), ThreadPoolExecutor(4) as pool:
        served = list(pool.map(call, requests, timeout=300))
        bad_shape = _post(f"{serve_url}/residual", json.dumps({"x": [[0.0] * (DIM - 1)]}).encode(), "application/json")
        not_json = _post(f"{serve_url}/residual", b"not json", "application/json")
    for got, want in zip(served, _direct(path, requests), strict=True):
        assert got.shape == want.shape == (3, want.shape[1])
        np.testing.assert_array_equal(got, want)
    assert bad_shape[0] == 400
    assert "InputShapeError" in json.loads(bad_shape[1])["error"]
    assert not_json[0] == 400
