"""The Quantizer API shared by every backend: input checks, layouts, chunking, array kinds.

A backend is a *runner* with one method, ``infer(feed) -> outputs``, that runs the exported
graph on inputs in the graph's own layout (as a Polygraphy runner does). `Quantizer` turns what
the user passes (numpy or torch, any accepted layout, any size) into chunks of at most
`chunk_size` tokens in that layout, runs them, and writes the results into preallocated outputs,
so the extra memory of a call is bounded by the chunk, not by N.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from vqdeploy.checks import (
    as_tensor,
    check_axis_size,
    check_finite,
    check_floating,
    check_index_range,
    check_integer,
    check_positive_int,
    check_rank,
)
from vqdeploy.errors import (
    BackendOutputError,
    NonFiniteInputError,
    QuantizerClosedError,
    UnsupportedOptionError,
)
from vqdeploy.export.metadata import ExportInfo
from vqdeploy.nn.conventions import SEED, residual_indices_from_seed, residual_indices_to_seed
from vqdeploy.spec import RESIDUAL_KINDS, QuantizerSpec

# Scores a chunk may hold (float32) where the backend materialises them: 1M values = 4 MiB per
# score-sized buffer in the backend (ONNX Runtime runs the function body MatMul -> ArgMin).
CHUNK_SCORE_BUDGET = 2**20
# Vector values a chunk may hold where the search itself is tiled (the torch backend): 2M float32
# = 8 MiB per vector-sized buffer; the search adds its own bounded tile (vqdeploy.ops.cpu_kernels).
# Each chunk is one call of the op, whose set-up and exact re-check are per call: 2M values instead
# of 1M took the torch backend from 51.6 to 47.8 ms at 262144x32x256 (op 43.7 ms; benchmarks/RESULTS.md).
CHUNK_VECTOR_BUDGET = 2**21
MIN_CHUNK = 256
# Tokens per chunk where a chunk is a view of the user's input that the search reads as it is (the
# torch backend's encode of a VectorQuantize without projection or cosine: `view_chunk_tokens`).
# Such a chunk copies nothing, and only the op's int64 indices and flags (9 MiB here) scale with it;
# fewer op calls save their per-call set-up and exact re-solve (benchmarks/RESULTS.md).
VIEW_CHUNK_TOKENS = 2**20


def default_chunk_size(info: ExportInfo, materializes_scores: bool = True) -> int:
    """Tokens per chunk: a chunk's N x K scores within CHUNK_SCORE_BUDGET where the backend holds
    them all, else its N x D vectors within CHUNK_VECTOR_BUDGET."""
    if materializes_scores:
        return max(MIN_CHUNK, CHUNK_SCORE_BUDGET // max(info.codebook_size, 1))
    return max(MIN_CHUNK, CHUNK_VECTOR_BUDGET // max(info.dim, 1))


def chunk_shape(info: ExportInfo, tokens: int) -> tuple[int, ...]:
    """Shape of the graph input for a chunk of `tokens` tokens, as `Quantizer` feeds it (batch 1)."""
    spec = QuantizerSpec.from_info(info)
    return spec.graph_indices_shape(1, tokens) if info.part == "decode" else spec.input_shape(1, tokens)


class Runner(Protocol):
    """What a backend provides: run the graph on one feed, in the graph's layout."""

    name: str
    device: str
    float_dtype: torch.dtype  # dtype of the graph's float input / output vectors
    materializes_scores: bool  # whether one call holds all N x K scores (sets the default chunk)
    # optional: max_tokens, the largest chunk the runner takes (the default chunk where it is set)

    def infer(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]: ...

    def close(self) -> None: ...


def tiles(groups: int, tokens: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    """(g0, g1, t0, t1) tiles of a groups x tokens grid holding about `size` tokens each.

    Long groups are cut along their tokens; short ones are taken several at a time, so a batch of
    many small images costs few backend calls.
    """
    if tokens >= size or groups == 1:
        for group in range(groups):
            for start in range(0, tokens, size):
                yield group, group + 1, start, min(start + size, tokens)
        return
    per_tile = max(1, size // max(tokens, 1))
    for group in range(0, groups, per_tile):
        yield group, min(group + per_tile, groups), 0, tokens


@dataclass
class _TokenView:
    """A user array seen as G groups of T tokens, read a tile at a time: never copied whole.

    channel_last: source (G, T, d); channel_first: source (G, d, T), or (G, d, H, W) for an image
    whose height and width axes cannot be merged in a view (then ``width`` = W).
    """

    source: torch.Tensor
    groups: int
    tokens: int
    channel_first: bool
    width: int = 0

    def block(self, g0: int, g1: int, t0: int, t1: int) -> torch.Tensor | None:
        """The tile's values as a view, (g, t, d) channel last or (g, d, t) channel first; None for
        an image read row by row (`copy_into` writes those)."""
        if self.width:
            return None
        return self.source[g0:g1, :, t0:t1] if self.channel_first else self.source[g0:g1, t0:t1]

    def copy_into(self, out: torch.Tensor, g0: int, g1: int, t0: int, t1: int) -> None:
        """Write the tile's values into `out`, (g, t, d) channel last or (g, d, t) channel first
        (casting to out's dtype): at most three copies for an image read row by row (a partial
        first row, the whole rows, a partial last row), no temporary."""
        if not self.width:
            out.copy_(self.block(g0, g1, t0, t1))
            return
        w, source, start = self.width, self.source[g0:g1], t0
        if start % w:  # the end of a row
            end = min(t1, (start // w + 1) * w)
            out[:, :, : end - t0].copy_(source[:, :, start // w, start % w : start % w + end - start])
            start = end
        if t1 // w > start // w:  # whole rows
            h0, h1 = start // w, t1 // w
            out[:, :, start - t0 : start - t0 + (h1 - h0) * w].unflatten(2, (h1 - h0, w)).copy_(source[:, :, h0:h1])
            start = h1 * w
        if start < t1:  # the beginning of a row
            out[:, :, start - t0 :].copy_(source[:, :, start // w, : t1 - start])

    def rows(self, groups: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(F, d): the tokens at (group, position) pairs."""
        if self.width:
            return self.source[groups, :, positions // self.width, positions % self.width]
        return self.source[groups, :, positions] if self.channel_first else self.source[groups, positions]


def _search_dtype(float_dtype: torch.dtype) -> torch.dtype:
    """The dtype a backend's search sees for inputs fed as `float_dtype`: half-precision inputs as
    they are (the graph widens them exactly), wider ones after the graph's cast to float32."""
    return float_dtype if float_dtype in (torch.float16, torch.bfloat16) else torch.float32


class Quantizer:
    """Runs a vqdeploy export: ``encode(x)``, ``decode(indices)``, ``quantize(x)``.

    Numpy in gives numpy out; a torch tensor in gives a torch tensor out on the same device.
    Usable as a context manager; ``close()`` releases the backend's session or engine.
    """

    def __init__(self, info: ExportInfo, runner: Runner, chunk_size: int | None = None):
        self.info = info
        self._runner = runner
        # A runner with a fixed largest input (a TensorRT engine's profile) says so in max_tokens.
        self.chunk_size = check_positive_int(chunk_size, "chunk_size", UnsupportedOptionError) if chunk_size is not None \
            else getattr(runner, "max_tokens", None) or default_chunk_size(info, runner.materializes_scores)
        # Larger chunks where they are views the search reads as they are (never with a chunk_size asked for).
        self._view_chunk = getattr(runner, "view_chunk_tokens", None) if chunk_size is None else None
        # close() waits for calls in flight and refuses new ones (QuantizerClosedError).
        self._state = threading.Condition()
        self._active = 0
        self._closed = False
        self.spec = QuantizerSpec.from_info(info)
        self._channel_first = self.spec.layout.channel_first
        self._residual = self.spec.residual
        # The graph's ResidualVQ indices are (q, b, n), a GroupedResidualVQ's (groups * q, b, n); the API
        # speaks the module's conventions.
        self._conventions = self.spec.conventions
        self._groups = self.spec.groups if self.spec.grouped else 0
        if info.kind not in (*RESIDUAL_KINDS, "VectorQuantize", "model"):
            raise UnsupportedOptionError(
                f"vqdeploy.runtime runs VectorQuantize, ResidualVQ, GroupedResidualVQ and SplitResidualVQ exports; this "
                f"file holds {info.kind} (run it with onnxruntime.InferenceSession: its inputs and outputs keep the "
                "codec's layout)"
            )

    # -- public API ---------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._runner.name

    @property
    def device(self) -> str:
        return self._runner.device

    def encode(self, x: Any) -> Any:
        """Indices of the nearest codes: (b, n[, heads]); images (b, h, w[, heads]); ResidualVQ (q, b, n),
        or (b, n, q) for a module with vector-quantize-pytorch's conventions (as the eager module);
        GroupedResidualVQ (g, q, b, n), or (g, b, n, q) with 1.32's conventions."""
        self._require("encode", ("encode", "quantize"))
        with self._in_use("encode"):
            return self._to_module_layout(self._run_vectors(x, want_vectors=False)[1])

    def quantize(self, x: Any) -> tuple[Any, Any]:
        """(vectors, indices), as the eager module's first two outputs."""
        self._require("quantize", ("quantize",))
        with self._in_use("quantize"):
            vectors, indices = self._run_vectors(x, want_vectors=True)
        return vectors, self._to_module_layout(indices)

    def decode(self, indices: Any) -> Any:
        """Vectors for indices (in the layout encode returns), as the eager module's `get_output_from_indices`."""
        self._require("decode", ("decode",))
        with self._in_use("decode"):
            return self._decode(indices)

    def _decode(self, indices: Any) -> Any:
        if self._groups:
            indices = self._grouped_to_graph(indices)
        elif self._conventions != SEED:
            tensor, as_numpy = self._as_tensor(indices, "indices")
            check_rank(tensor, (3,), "indices", "batch, seq, quantizer (vector-quantize-pytorch's layout)")
            check_axis_size(tensor, 2, self.info.num_quantizers, "indices", "quantizers")
            indices = residual_indices_to_seed(self._conventions, tensor)
            indices = indices.numpy() if as_numpy else indices
        return self._run_decode(indices)

    def _grouped_to_graph(self, indices: Any) -> Any:
        """GroupedResidualVQ indices in the module's layout -> the graph's (groups * q, b, n)."""
        tensor, as_numpy = self._as_tensor(indices, "indices")
        stages = self.info.num_quantizers // self._groups
        if self._conventions != SEED:
            check_rank(tensor, (4,), "indices", "groups, batch, seq, quantizer (vector-quantize-pytorch's layout)")
            check_axis_size(tensor, 3, stages, "indices", "quantizers")
            tensor = tensor.movedim(-1, 1)
        else:
            check_rank(tensor, (4,), "indices", "groups, quantizer, batch, seq")
            check_axis_size(tensor, 1, stages, "indices", "quantizers")
        check_axis_size(tensor, 0, self._groups, "indices", "groups")
        tensor = tensor.reshape(-1, *tensor.shape[2:])
        return tensor.numpy() if as_numpy else tensor

    def _to_module_layout(self, indices: Any) -> Any:
        if self._groups:
            grouped = indices.reshape(self._groups, -1, *indices.shape[1:])  # (g, q, b, n)
            if self._conventions == SEED:
                return grouped
            if isinstance(grouped, np.ndarray):
                return np.ascontiguousarray(np.moveaxis(grouped, 1, -1))
            return grouped.movedim(1, -1).contiguous()
        if self._conventions == SEED:
            return indices
        if isinstance(indices, np.ndarray):
            return np.ascontiguousarray(np.moveaxis(indices, 0, -1))
        return residual_indices_from_seed(self._conventions, indices).contiguous()

    def close(self) -> None:
        """Release the backend; waits for calls in flight in other threads, refuses later ones."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._state.wait()
        self._runner.close()

    @contextlib.contextmanager
    def _in_use(self, method: str) -> Iterator[None]:
        with self._state:
            if self._closed:
                raise QuantizerClosedError(f"{method}() on a Quantizer that was closed; load the file again")
            self._active += 1
        try:
            yield
        finally:
            with self._state:
                self._active -= 1
                self._state.notify_all()

    def __enter__(self) -> Quantizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Quantizer(kind={self.info.kind}, part={self.info.part}, backend={self.backend}, device={self.device})"

    # -- helpers ---------------------------------------------------------------------------------------
    @property
    def search_is_exact(self) -> bool:
        """Whether this backend returns the exact argmin of the rows its search sees: the torch
        backend on CPU, and ONNX Runtime with the re-check body (the default for fused files)."""
        if self.backend == "torch":
            return torch.device(self.device).type == "cpu"
        return getattr(self._runner, "recheck_outputs", 0) > 0

    def _require(self, method: str, parts: tuple[str, ...]) -> None:
        if self.info.kind == "model":
            raise UnsupportedOptionError(
                "this file is a whole user model; run it with onnxruntime directly, or export the quantizer alone"
            )
        if self.info.part not in parts:
            raise UnsupportedOptionError(
                f"{method}() needs an export of part {' or '.join(parts)}; this file holds part {self.info.part!r} "
                f"(export again with part={parts[0]!r})"
            )

    def _as_tensor(self, array: Any, name: str) -> tuple[torch.Tensor, bool]:
        return as_tensor(array, name)

    def _split_flags(self, outputs: list[torch.Tensor], count: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Strip a runner's trailing ``recheck`` outputs; returns (graph outputs, flagged token positions).

        A runner whose search flags the rows its float32 margin cannot prove (ONNX Runtime, with the
        re-check body) returns one bool[M] per search after its graph outputs; a flagged row marks
        its token (M = tokens, or tokens x heads, token-major).
        """
        extra = getattr(self._runner, "recheck_outputs", 0)
        if not extra:
            return outputs, None
        outputs, flags = list(outputs[:-extra]), outputs[-extra:]
        flagged = torch.zeros(count, dtype=torch.bool)
        for flag in flags:
            flag = flag.cpu()
            if flag.numel() % max(count, 1):
                raise BackendOutputError(
                    f"the {self.backend} backend flagged {flag.numel()} rows for {count} tokens: the graph does not "
                    "match its metadata"
                )
            flagged |= flag.reshape(count, -1).any(dim=1)
        return outputs, torch.nonzero(flagged).squeeze(1)

    def _resolve_tokens(
        self, tokens: _TokenView, groups: torch.Tensor, positions: torch.Tensor,
        index_rows: torch.Tensor, vectors: torch.Tensor | None,
    ) -> None:
        """Re-solve the flagged tokens (group, position) through the runner's exact torch path and
        write their indices and vectors (every stage of a residual stack) over the runner's."""
        info, name = self.info, self.info.inputs[0]
        heads = (info.heads,) if info.heads > 1 else ()
        step = min(4096, max(1, self.chunk_size or 4096))  # tokens re-solved per exact call
        for start in range(0, positions.numel(), step):
            g, t = groups[start : start + step], positions[start : start + step]
            rows = tokens.rows(g.to(tokens.source.device), t.to(tokens.source.device))  # (F, d)
            if self._channel_first:
                fed = self._feed_vectors(rows.t().unsqueeze(0).to(self._runner.float_dtype))
            else:
                fed = self._feed_vectors(rows.unsqueeze(0).to(self._runner.float_dtype))
            outputs = self._runner.exact_infer({name: fed})
            found = outputs[-1].to(index_rows.device)
            g, t = g.to(index_rows.device), t.to(index_rows.device)
            if self._residual:
                index_rows[:, g, t] = found.reshape(info.num_quantizers, -1)
            else:
                index_rows[g, t] = found.reshape(-1, *heads)
            if vectors is not None:
                block = outputs[0].to(vectors.device, vectors.dtype)
                if self._channel_first:
                    vectors[g, :, t] = block.reshape(info.dim, -1).t()
                else:
                    vectors[g, t] = block.reshape(-1, info.dim)

    def _check_output(self, out: torch.Tensor, expected: int, what: str, tokens: int) -> None:
        if out.numel() != expected:
            raise BackendOutputError(
                f"the {self.backend} backend returned {what} of shape {tuple(out.shape)} for {tokens} tokens, "
                f"where the file's metadata ({self.info.kind}, {self.info.num_quantizers} stage(s), "
                f"{self.info.heads} head(s), dim {self.info.dim}) means {expected} values: the graph does not "
                "match its metadata"
            )

    def _returned(self, tensor: torch.Tensor, as_numpy: bool) -> Any:
        return tensor.numpy() if as_numpy else tensor

    def _check_finite(self, x: torch.Tensor) -> None:
        """NonFiniteInputError naming the user's input, on what the search sees: x after the cast to
        the graph's dtype (a float64 1e300 is inf there)."""
        check_finite(x, "x", dtype=_search_dtype(self._runner.float_dtype), what=f"the {self.backend} backend's search")

    def _infer_checked(self, x: torch.Tensor, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The runner on one chunk. A runner whose search detects NaN/Inf itself raises
        NonFiniteInputError on the chunk's rows; the error is worded on the user's whole input (the
        count, its shape and dtype) by the check the Quantizer skipped, which then runs once."""
        try:
            return self._runner.infer(feed)
        except NonFiniteInputError:
            if getattr(self._runner, "search_detects_non_finite", False):
                self._check_finite(x)  # raises, naming x; if x is finite, the rows went bad inside the graph
            raise

    def _token_view(self, x: torch.Tensor) -> tuple[_TokenView, tuple[int, ...]]:
        """Check x and view it as token groups (no copy, whatever its strides); returns the view and
        the shape indices come back in."""
        info = self.info
        check_floating(x, "x")
        layout = self.spec.layout
        if self._residual:
            check_rank(x, (3,), "x", layout.describe())
        else:
            check_rank(x, layout.ranks, "x", layout.expected())
        dim_axis = 1 if self._channel_first else -1
        check_axis_size(x, dim_axis, info.dim, "x", "dim")
        if not getattr(self._runner, "search_detects_non_finite", False):
            self._check_finite(x)
        if x.ndim == 2:  # one token per batch row: (b, d) -> (1, b, d), or (1, d, b) channel first
            view = x.t().unsqueeze(0) if self._channel_first else x.unsqueeze(0)
            return _TokenView(view, 1, x.shape[0], self._channel_first), (x.shape[0],)
        if not self._channel_first:
            return _TokenView(x, x.shape[0], x.shape[1], False), tuple(x.shape[:-1])
        if x.ndim == 3:
            return _TokenView(x, x.shape[0], x.shape[2], True), (x.shape[0], x.shape[2])
        batch, spatial = x.shape[0], tuple(x.shape[2:])  # (height, width) or (depth, height, width)
        tokens = math.prod(spatial)
        try:
            view = x.view(batch, info.dim, tokens)
        except RuntimeError:  # strides that merge no view of the token axes
            if x.ndim == 4:  # an image: read it row by row
                return _TokenView(x, batch, tokens, True, width=spatial[-1]), (batch, *spatial)
            view = x.reshape(batch, info.dim, tokens)  # a volume: one copy
        return _TokenView(view, batch, tokens, True), (batch, *spatial)

    def _feed_vectors(self, chunk: torch.Tensor) -> torch.Tensor:
        """A chunk in the graph's layout: (1, c, d), (1, d, c), (1, d, 1, c) for images, (1, d, 1, 1, c) for volumes."""
        if self.spec.layout.image:
            chunk = chunk.reshape(self.spec.input_shape(1, chunk.shape[-1]))
        return chunk.contiguous()

    def _run_vectors(self, x: Any, want_vectors: bool) -> tuple[Any, Any]:
        x, as_numpy = self._as_tensor(x, "x")
        tokens, index_shape = self._token_view(x)
        info = self.info
        heads = (info.heads,) if info.heads > 1 else ()
        index_rows = torch.empty(
            (info.num_quantizers, tokens.groups, tokens.tokens) if self._residual else (tokens.groups, tokens.tokens, *heads),
            dtype=torch.int64,
            device=x.device,
        )
        float_dtype = self._runner.float_dtype
        vector_shape = (tokens.groups, info.dim, tokens.tokens) if self._channel_first else \
            (tokens.groups, tokens.tokens, info.dim)
        vectors = torch.empty(vector_shape, dtype=float_dtype, device=x.device) if want_vectors else None
        name = self.info.inputs[0]
        flagged_groups: list[torch.Tensor] = []
        flagged_tokens: list[torch.Tensor] = []
        size = self.chunk_size
        if self._view_chunk and not self._channel_first and x.dtype == float_dtype and x.is_contiguous():
            size = max(size, self._view_chunk)  # every chunk is then a view of x: nothing is copied
        staging: torch.Tensor | None = None  # one chunk's input, reused by every chunk that is not a view
        for g0, g1, t0, t1 in tiles(tokens.groups, tokens.tokens, size):
            count = (g1 - g0) * (t1 - t0)
            shape = self.spec.input_shape(1, count)
            block = tokens.block(g0, g1, t0, t1)
            if block is not None and block.dtype == float_dtype and block.is_contiguous() and \
                    (g1 - g0 == 1 or not self._channel_first):
                fed = block.view(shape)  # the user's memory, in the graph's layout already
            else:
                # A fresh buffer per chunk (a cast, a copy of strided rows), freed among the small
                # allocations of each call, grew glibc's heap by 141 MiB of free memory in one
                # encode of 4M vectors (tests/hardening/test_memory.py); one buffer per call instead.
                if staging is None:
                    largest = min(size, tokens.groups * tokens.tokens) * info.dim
                    staging = torch.empty(largest, dtype=float_dtype, device=x.device)
                fed = staging[: count * info.dim].view(shape)
                if self._channel_first:  # (1, d, gb * tc) seen as (gb, d, tc)
                    tokens.copy_into(fed.view(info.dim, g1 - g0, t1 - t0).permute(1, 0, 2), g0, g1, t0, t1)
                else:
                    tokens.copy_into(fed.view(g1 - g0, t1 - t0, info.dim), g0, g1, t0, t1)
            outputs, flagged = self._split_flags(self._infer_checked(x, {name: fed}), count)
            if flagged is not None and flagged.numel():  # chunk order is (group, token)
                flagged_groups.append(g0 + flagged // (t1 - t0))
                flagged_tokens.append(t0 + flagged % (t1 - t0))
            indices_out = outputs[-1]
            per_token = info.num_quantizers if self._residual else math.prod(heads)
            self._check_output(indices_out, count * per_token, "indices", count)
            if vectors is not None:
                self._check_output(outputs[0], count * info.dim, "vectors", count)
            if self._residual:  # chunk order is (group, token)
                index_rows[:, g0:g1, t0:t1] = indices_out.reshape(info.num_quantizers, g1 - g0, t1 - t0)
            else:
                index_rows[g0:g1, t0:t1] = indices_out.reshape(g1 - g0, t1 - t0, *heads)
            if vectors is not None:
                if self._channel_first:
                    vectors[g0:g1, :, t0:t1] = outputs[0].reshape(info.dim, g1 - g0, t1 - t0).permute(1, 0, 2)
                else:
                    vectors[g0:g1, t0:t1] = outputs[0].reshape(g1 - g0, t1 - t0, info.dim)
        if flagged_tokens:  # one exact pass over every chunk's flagged tokens
            self._resolve_tokens(tokens, torch.cat(flagged_groups), torch.cat(flagged_tokens), index_rows, vectors)
        if self._residual:
            indices = index_rows.reshape(info.num_quantizers, *index_shape)
        else:
            indices = index_rows.reshape(*index_shape, *heads)
        if vectors is not None:
            vectors = vectors[0].t().contiguous() if self._channel_first and x.ndim == 2 else vectors.reshape(x.shape)
            return self._returned(vectors, as_numpy), self._returned(indices, as_numpy)
        return None, self._returned(indices, as_numpy)

    def _run_decode(self, indices: Any) -> Any:
        indices, as_numpy = self._as_tensor(indices, "indices")
        info = self.info
        check_integer(indices, "indices")
        check_index_range(indices, info.codebook_size, "indices", allow_dropped=self._residual)
        heads = (info.heads,) if info.heads > 1 else ()
        if self._residual:
            check_rank(indices, (3,), "indices", "quantizer, batch, seq")
            check_axis_size(indices, 0, info.num_quantizers, "indices", "quantizers")
            lead = tuple(indices.shape[1:])
        else:
            layout = self.spec.layout
            base = 1 + len(layout.token_axes)  # batch and the token axes
            check_rank(indices, (base + len(heads),) if layout.image else (1 + len(heads), 2 + len(heads)), "indices",
                       "indices as encode returns them")
            if heads:
                check_axis_size(indices, -1, info.heads, "indices", "heads")
            lead = tuple(indices.shape[: indices.ndim - len(heads)])
        # Vectors come back channel-first for channel-first layouts, except for one token per row.
        channel_first_out = self._channel_first and len(lead) > 1
        groups = lead[0] if channel_first_out else 1
        tokens = math.prod(lead) // groups if groups else 0
        if self._residual:
            view = indices.reshape(info.num_quantizers, groups, tokens)
        else:
            view = indices.reshape(groups, tokens, *heads)
        float_dtype = self._runner.float_dtype
        shape = (groups, info.dim, tokens) if channel_first_out else (tokens, info.dim)
        vectors = torch.empty(shape, dtype=float_dtype, device=indices.device)
        name = info.inputs[0]
        for g0, g1, t0, t1 in tiles(groups, tokens, self.chunk_size):
            count = (g1 - g0) * (t1 - t0)
            if self._residual:
                chunk = view[:, g0:g1, t0:t1]
            else:
                chunk = view[g0:g1, t0:t1].reshape(chunk_shape(info, count))
            out = self._runner.infer({name: chunk.to(torch.int64).contiguous()})[0]
            self._check_output(out, count * info.dim, "vectors", count)
            if self._residual and self._channel_first:  # (gb, d, tc): the module's own layout
                rows = out.reshape(g1 - g0, info.dim, t1 - t0).permute(0, 2, 1).reshape(count, info.dim)
            else:
                rows = out.reshape(info.dim, count).t() if self._channel_first else out.reshape(count, info.dim)
            if channel_first_out:
                vectors[g0:g1, :, t0:t1] = rows.reshape(g1 - g0, t1 - t0, info.dim).permute(0, 2, 1)
            else:
                vectors[t0:t1] = rows
        vectors = vectors.reshape(lead[0], info.dim, *lead[1:]) if channel_first_out else vectors.reshape(*lead, info.dim)
        return self._returned(vectors, as_numpy)
