"""A Ray Serve deployment of a vqdeploy export that merges concurrent requests into one backend call.

Each replica loads the export once (`vqdeploy.runtime.load`) from a path every replica can read.
A request is token rows, x[T, D] (T >= 1, any T); ``@serve.batch`` collects the requests that
arrive within `batch_wait_timeout_s`, up to `max_batch_tokens` tokens in all, concatenates them
along the token axis, encodes them in ONE backend call, and splits the indices back per request.
Each token's index depends on that token alone (the nearest-code contract), so a request's tokens
are those of ``Quantizer.encode`` on its rows alone, whatever it was batched with.

Over HTTP (POST to the route): a JSON body ``{"x": [[...], ...]}`` answers ``{"indices": [...]}``;
a body in .npy format (Content-Type: application/x-npy) answers .npy bytes. Indices per request:
(T,) or (T, heads) for VectorQuantize, (Q, T) for ResidualVQ (`Quantizer.encode` of the rows as
one sequence, without the batch axis). Bad input answers 400 with ``{"error": ...}``.

>>> from vqdeploy.serving.ray_serve import build_app          # doctest: +SKIP
>>> from ray import serve                                      # doctest: +SKIP
>>> serve.run(build_app("vq_encode.onnx"), route_prefix="/vq")  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vqdeploy.errors import BackendNotAvailableError, InputShapeError, UnsupportedOptionError, VQDeployError
from vqdeploy.export.metadata import ExportInfo
from vqdeploy.spec import QuantizerSpec

NPY_CONTENT_TYPE = "application/x-npy"
DEFAULT_MAX_BATCH_TOKENS = 65536
DEFAULT_BATCH_WAIT_S = 0.005


def _import_serve():
    try:
        from ray import serve
    except ImportError as error:
        raise BackendNotAvailableError("Ray Serve is not installed: pip install 'vqdeploy[serve]' (ray[serve])") from error
    return serve


def rows_to_input(info: ExportInfo, rows: np.ndarray) -> np.ndarray:
    """Token rows (T, D) -> an input `Quantizer.encode` takes, holding them as one sequence."""
    return QuantizerSpec.from_info(info).rows_to_input(rows)


def indices_of_rows(info: ExportInfo, indices: np.ndarray, tokens: int) -> np.ndarray:
    """`Quantizer.encode` of `rows_to_input` -> indices per token: (T[, heads]); ResidualVQ (Q, T)."""
    spec = QuantizerSpec.from_info(info)
    per_token = spec.token_major(indices, tokens)
    if spec.residual:
        return np.ascontiguousarray(per_token.T)
    return per_token if info.heads > 1 else per_token.reshape(tokens)


def check_rows(info: ExportInfo, x: Any) -> np.ndarray:
    """A request's token rows as float32 (T, D); typed errors for anything else (answered 400)."""
    try:
        rows = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise InputShapeError(f"x must be a (tokens, {info.dim}) array of numbers: {error}") from error
    if rows.ndim != 2 or rows.shape[1] != info.dim or rows.shape[0] < 1:
        raise InputShapeError(f"x must have shape (tokens >= 1, {info.dim}), got {rows.shape}")
    if not np.isfinite(rows).all():
        from vqdeploy.errors import NonFiniteInputError

        raise NonFiniteInputError("x holds NaN or infinite values")
    return rows


class QuantizerDeployment:
    """The replica's class (wrapped by `serve.deployment` in `build_app`); usable without Serve too.

    model_path: a vqdeploy export of part encode (or quantize); backend, device and load_options go to
    `vqdeploy.runtime.load`. max_batch_tokens caps the tokens of one merged call (a larger request
    runs alone); batch_wait_timeout_s is how long a batch waits for more requests.
    """

    _batching_installed = False

    def __init__(
        self,
        model_path: str | os.PathLike,
        backend: str = "ort",
        device: str = "cpu",
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
        **load_options: Any,
    ):
        from vqdeploy import runtime

        _install_batching()  # in a replica the class arrives by reference, undecorated
        if max_batch_tokens < 1:
            raise UnsupportedOptionError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.quantizer = runtime.load(model_path, backend=backend, device=device, **load_options)
        self.info = self.quantizer.info
        if self.info.kind == "model" or self.info.part not in ("encode", "quantize"):
            raise UnsupportedOptionError(
                f"{model_path} holds part {self.info.part!r} of a {self.info.kind}; the deployment serves encode: "
                "export the quantizer with part='encode'"
            )
        self.max_batch_tokens = max_batch_tokens
        self.batch_calls = 0  # merged backend calls so far (what batching saves is visible in stats())
        self.requests = 0
        self._encode_batch.set_max_batch_size(max_batch_tokens)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def encode_rows(self, rows: np.ndarray) -> np.ndarray:
        """Indices of token rows (T, D), in this process, in one backend call."""
        return indices_of_rows(self.info, self.quantizer.encode(rows_to_input(self.info, rows)), rows.shape[0])

    async def encode(self, x: Any) -> np.ndarray:
        """Indices for one request's token rows, merged with whatever else is waiting."""
        rows = check_rows(self.info, x)
        self.requests += 1
        if rows.shape[0] > self.max_batch_tokens:  # too big to share a batch: alone, still one call
            self.batch_calls += 1
            return await asyncio.to_thread(self.encode_rows, rows)
        return await self._encode_batch(rows)

    async def _encode_batch(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        counts = [r.shape[0] for r in requests]
        merged = np.concatenate(requests, axis=0) if len(requests) > 1 else requests[0]
        self.batch_calls += 1
        # Off the event loop, so requests keep queueing for the next batch while this one runs.
        indices = await asyncio.to_thread(self.encode_rows, merged)
        splits = np.cumsum(counts)[:-1]
        return list(np.split(indices, splits, axis=-1 if QuantizerSpec.from_info(self.info).residual else 0))

    def stats(self) -> dict[str, int]:
        """Requests served and backend calls made by this replica."""
        return {"requests": self.requests, "batch_calls": self.batch_calls}

    async def __call__(self, request: Any) -> Any:
        """HTTP entry point (a Starlette request): JSON or .npy in, the same kind out."""
        from starlette.responses import JSONResponse, Response

        as_npy = request.headers.get("content-type", "").startswith(NPY_CONTENT_TYPE)
        body = await request.body()
        try:
            if as_npy:
                x = np.load(io.BytesIO(body), allow_pickle=False)
            else:
                payload = json.loads(body)
                if not isinstance(payload, dict) or "x" not in payload:
                    raise InputShapeError('the JSON body must be an object {"x": [[...], ...]}')
                x = payload["x"]
            indices = await self.encode(x)
        except (VQDeployError, ValueError) as error:  # json.JSONDecodeError and np.load's errors are ValueErrors
            return JSONResponse({"error": f"{type(error).__name__}: {error}"}, status_code=400)
        if as_npy:
            buffer = io.BytesIO()
            np.save(buffer, indices)
            return Response(buffer.getvalue(), media_type=NPY_CONTENT_TYPE)
        return JSONResponse({"indices": indices.tolist()})


def _token_count(requests: list[np.ndarray]) -> int:
    return sum(r.shape[0] for r in requests)


def _install_batching() -> None:
    """Wrap the batch method with @serve.batch (done on first use, so importing needs no Ray)."""
    if QuantizerDeployment._batching_installed:
        return
    serve = _import_serve()
    # Same attribute name as the function: serve.batch finds `self` by looking the name up on it.
    QuantizerDeployment._encode_batch = serve.batch(
        max_batch_size=DEFAULT_MAX_BATCH_TOKENS, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S, batch_size_fn=_token_count
    )(QuantizerDeployment._encode_batch)
    QuantizerDeployment._batching_installed = True


def build_app(
    model_path: str | os.PathLike,
    *,
    backend: str = "ort",
    device: str = "cpu",
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
    num_replicas: int = 1,
    max_ongoing_requests: int = 256,
    ray_actor_options: dict[str, Any] | None = None,
    **load_options: Any,
):
    """A Ray Serve application (``serve.run(build_app(path))``) serving `model_path`'s encode.

    max_ongoing_requests bounds the requests a replica holds at once (what one batch can merge);
    ray_actor_options go to each replica (default: 1 CPU). Other options go to `runtime.load`
    (e.g. intra_op_num_threads for ORT).
    """
    serve = _import_serve()
    _install_batching()
    deployment = serve.deployment(
        QuantizerDeployment,
        name="vqdeploy_encode",
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options=ray_actor_options if ray_actor_options is not None else {"num_cpus": 1},
    )
    return deployment.bind(str(model_path), backend=backend, device=device, max_batch_tokens=max_batch_tokens,
                           batch_wait_timeout_s=batch_wait_timeout_s, **load_options)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_serve(temp_dir: str | os.PathLike, *, num_cpus: int = 2, host: str = "127.0.0.1",
                port: int | None = None) -> Iterator[str]:
    """A private, local Ray with Serve for one machine; yields the HTTP base URL, shuts both down after.

    A new cluster (never one already running), `num_cpus` CPUs, usage stats and dashboard off, Ray's
    files under `temp_dir` (keep it short: Ray's socket paths must stay under ~107 characters),
    a random in-memory auth token (nothing written to ~/.ray), Serve's HTTP on host:port (default:
    a free port).
    """
    serve = _import_serve()
    import ray

    temp_dir = Path(temp_dir)
    if len(str(temp_dir.resolve())) > 50:
        raise UnsupportedOptionError(f"Ray's temp dir {temp_dir} is too long for its socket paths; use <= 50 characters")
    port = free_port(host) if port is None else port
    # RAY_AUTH_MODE stays unset: ray.init then turns token auth on itself (re-reading its config) and
    # takes the token from RAY_AUTH_TOKEN instead of writing one to ~/.ray.
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {key: os.environ.get(key) for key in (*env, "RAY_AUTH_MODE")}
    if saved["RAY_AUTH_MODE"] is not None:
        raise UnsupportedOptionError("local_serve sets up Ray's auth itself; unset RAY_AUTH_MODE")
    os.environ.update(env)  # read by ray.init and inherited by the processes it starts
    _reset_ray_token_cache()  # Ray caches "no token" from its import
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(temp_dir.resolve()),
                 object_store_memory=128 * 2**20, log_to_driver=False)
        try:
            serve.start(http_options={"host": host, "port": port})
            yield f"http://{host}:{port}"
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reset_ray_token_cache()  # else a later ray.init in this process presents our stale token


def _reset_ray_token_cache() -> None:
    """Make Ray read its auth token anew (a private API; absent in other Ray versions)."""
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()


__all__ = [
    "NPY_CONTENT_TYPE",
    "QuantizerDeployment",
    "build_app",
    "check_rows",
    "free_port",
    "indices_of_rows",
    "local_serve",
    "rows_to_input",
]
