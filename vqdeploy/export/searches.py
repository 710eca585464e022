"""The searches inside a model: every nearest-code call its quantizers make, in call order.

A whole-model export holds one ``vqdeploy::NearestCode`` node per search (a residual stage, a head
with its own codebook, or a VectorQuantize's one codebook), in the order the eager forward makes
them. `record_searches` runs the eager model and records, for each search, the quantizer it
belongs to, the rows it saw and the tokens it returned, and for each quantizer call its input;
export uses the order to name the nodes' rows and tokens in the metadata, verify and the torch
backend use the rows. Nothing in the model is changed: the recorder wraps the codebooks' bound
``nearest`` methods on the instances for the duration of the context only.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vqdeploy.nn import FactorizedResidualVQ, ResidualVQ, VectorQuantize
from vqdeploy.nn.conventions import SEED, residual_indices_from_seed
from vqdeploy.ops import nearest_code


@dataclass
class SearchCall:
    """One nearest-code search of the eager forward."""

    quantizer: str  # module path of the VectorQuantize / ResidualVQ / FactorizedResidualVQ ("" for the model itself)
    call: int  # which call of that quantizer (a model may call one quantizer more than once)
    search: int  # stage (ResidualVQ) or head (separate codebooks) within the call, else 0
    rows: torch.Tensor  # (M, d) float32: what the search saw
    codebook: torch.Tensor  # (K, d)
    tokens: torch.Tensor  # (M,) int64


@dataclass
class QuantizerCall:
    """One forward call of a quantizer: its input and the indices it returned."""

    quantizer: str
    call: int
    input: torch.Tensor
    indices: torch.Tensor | None = None


@dataclass
class Recording:
    searches: list[SearchCall] = field(default_factory=list)
    calls: list[QuantizerCall] = field(default_factory=list)


def codebooks_of(quantizer: nn.Module) -> list[nn.Module]:
    """The distinct EMA codebooks a quantizer searches (a shared ResidualVQ codebook once); the
    stages of a FactorizedResidualVQ (each searches its own normalised codebook)."""
    if isinstance(quantizer, FactorizedResidualVQ):
        return list(quantizer.quantizers)
    layers = quantizer.layers if isinstance(quantizer, ResidualVQ) else [quantizer]
    seen: list[nn.Module] = []
    for layer in layers:
        if not any(layer._codebook is c for c in seen):
            seen.append(layer._codebook)
    return seen


def search_label(quantizer: nn.Module, search: int) -> str:
    """"stage s" for a ResidualVQ / FactorizedResidualVQ, "head h" for separate codebooks per head, else "codebook"."""
    if isinstance(quantizer, ResidualVQ | FactorizedResidualVQ):
        return f"stage {search}"
    if isinstance(quantizer, VectorQuantize) and quantizer.heads > 1 and quantizer.separate_codebook_per_head:
        return f"head {search}"
    return "codebook"


@contextlib.contextmanager
def record_searches(model: nn.Module, quantizers: dict[str, nn.Module], search_dtype: torch.dtype | None = None
                    ) -> Iterator[Recording]:
    """Record every search and quantizer call of ``model``'s forward while the context is open.

    ``search_dtype=torch.float32`` runs the searches on float32 rows and codes whatever the model's
    dtype (a float64 copy of the model, used for the upstream error, keeps float32 searches).
    """
    recording = Recording()
    counters = {path: itertools.count() for path in quantizers}
    current: dict[str, int] = {}
    searches_in_call: dict[str, int] = {}
    patched: list[nn.Module] = []
    hooks = []

    def pre_hook(path: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current[path] = next(counters[path])
            searches_in_call[path] = 0
            x = args[0] if args else kwargs.get("x")
            recording.calls.append(QuantizerCall(path, current[path], x.detach()))

        return hook

    def post_hook(path: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            call = next(c for c in reversed(recording.calls) if c.quantizer == path)
            if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                call.indices = output[1].detach()  # a tuple of per-stage tensors (SNAC) names no one output

        return hook

    def wrap(path: str, codebook: nn.Module):
        original = codebook.nearest

        def nearest(flat: torch.Tensor) -> torch.Tensor:
            embed = codebook.embed.detach()
            if search_dtype is None:
                indices = original(flat)
            else:
                indices = torch.stack([nearest_code(flat[h].to(search_dtype), embed[h].to(search_dtype))
                                       for h in range(flat.shape[0])])
            for h in range(flat.shape[0]):
                recording.searches.append(SearchCall(
                    path, current.get(path, 0), searches_in_call.get(path, 0), flat[h].detach(),
                    embed[h], indices[h].detach()))
                searches_in_call[path] = searches_in_call.get(path, 0) + 1
            return indices

        return nearest

    def wrap_stage(path: str, stage: nn.Module):
        """A FactorizedStage's search: (M, d) normalised rows, always in float32."""
        original = stage.nearest

        def nearest(rows: torch.Tensor) -> torch.Tensor:
            indices = original(rows)
            recording.searches.append(SearchCall(
                path, current.get(path, 0), searches_in_call.get(path, 0), rows.detach(),
                stage.search_codebook().detach(), indices.detach()))
            searches_in_call[path] = searches_in_call.get(path, 0) + 1
            return indices

        return nearest

    try:
        for path, quantizer in quantizers.items():
            hooks.append(quantizer.register_forward_pre_hook(pre_hook(path), with_kwargs=True))
            hooks.append(quantizer.register_forward_hook(post_hook(path)))
            factorized = isinstance(quantizer, FactorizedResidualVQ)
            for codebook in codebooks_of(quantizer):
                # an instance attribute shadows the method
                codebook.nearest = wrap_stage(path, codebook) if factorized else wrap(path, codebook)
                patched.append(codebook)
        yield recording
    finally:
        for hook in hooks:
            hook.remove()
        for codebook in patched:
            codebook.__dict__.pop("nearest", None)


def reference_rows(quantizer: nn.Module, x: torch.Tensor, served: list[torch.Tensor]) -> list[torch.Tensor]:
    """The rows each search of one call of ``quantizer`` sees on input ``x`` when its searches
    returned ``served`` (one (M,) tensor per search): for a ResidualVQ the residual of stage s is
    x minus this module's codes of the served tokens of stages < s (`ResidualVQ.search_rows`;
    `FactorizedResidualVQ.search_rows` with the codec's own residual arithmetic)."""
    if isinstance(quantizer, FactorizedResidualVQ):
        return quantizer.search_rows(x, served_indices(quantizer, x, served))[: len(served)]
    if isinstance(quantizer, ResidualVQ):
        shape = quantizer.spec.layout.index_shape(x.shape)  # (b, n) in either channel layout
        stages = len(served)
        indices = torch.stack([t.reshape(-1).long().cpu() for t in served]).reshape(stages, *shape)
        if stages < quantizer.num_quantizers:
            pad = torch.full((quantizer.num_quantizers - stages, *shape), -1, dtype=torch.long)
            indices = torch.cat([indices, pad])
        rows = quantizer.search_rows(x, indices.to(x.device))
        return [rows[s] for s in range(stages)]
    rows = quantizer.search_rows(x)
    return [rows[h] for h in range(rows.shape[0])]


def served_indices(quantizer: nn.Module, x: torch.Tensor, served: list[torch.Tensor]) -> torch.Tensor:
    """The indices a quantizer returns (its own layout) when its searches returned ``served``."""
    if isinstance(quantizer, FactorizedResidualVQ):  # one (b, t_s) tensor per stage, stacked or a tuple
        return quantizer._layout([t.reshape(x.shape[0], -1).long() for t in served])
    if isinstance(quantizer, ResidualVQ):
        shape = quantizer.spec.layout.index_shape(x.shape)
        seed = torch.stack([t.reshape(-1).long() for t in served]).reshape(len(served), *shape)
        return seed if quantizer.conventions == SEED else residual_indices_from_seed(quantizer.conventions, seed)
    shape = quantizer._index_shape(x.shape)
    if quantizer.heads == 1:
        return served[0].reshape(shape)
    if quantizer.separate_codebook_per_head:
        return torch.stack([t.reshape(-1) for t in served], dim=-1).reshape(*shape, quantizer.heads)
    return served[0].reshape(*shape, quantizer.heads)


def find_token_layout(indices: torch.Tensor, output: torch.Tensor) -> list[int] | None:
    """An axis order p with ``indices.permute(p).reshape(output.shape) == output``, or None."""
    if output.dtype.is_floating_point or output.numel() != indices.numel():
        return None
    output = output.detach().long()
    for order in itertools.permutations(range(indices.ndim)):
        if torch.equal(indices.permute(order).reshape(output.shape).long(), output):
            return list(order)
    return None


__all__ = [
    "QuantizerCall",
    "Recording",
    "SearchCall",
    "find_token_layout",
    "record_searches",
    "reference_rows",
    "search_label",
    "served_indices",
]
