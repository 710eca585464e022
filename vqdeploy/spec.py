"""The one description of a quantizer's inputs and outputs: layout, sizes, index layout.

Every part of vqdeploy that shapes a tensor for a quantizer reads it from here: the modules
(`VectorQuantize.input_layout`), the exporter (example inputs, dynamic axes), the export
metadata (the fields `input_layout`, `kind`, `dim`, `heads`, `num_quantizers`, `codebook_size`
and the config's `conventions` are this spec, written by `QuantizerSpec.metadata_fields` and read
back by `QuantizerSpec.from_info`), the runtime (token views and chunk shapes), bench, verify,
serving and tokenize.

Layouts (the names are einops patterns of the input):

========  ===============================  ================================
name      input                            indices (VectorQuantize)
========  ===============================  ================================
b n d     (batch, seq, dim), channel last  (batch, seq[, heads])
b d n     (batch, dim, seq), channel first (batch, seq[, heads])
b d h w   (batch, dim, height, width)      (batch, height, width[, heads])
========  ===============================  ================================

A ResidualVQ takes ``b n d`` and its indices are (quantizer, batch, seq) in the graph and in
the seed's conventions, (batch, seq, quantizer) in vector-quantize-pytorch's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Layout:
    """How the tokens of an input are laid out."""

    name: str  # the einops pattern, as stored in the metadata
    channel_first: bool  # the feature axis is axis 1, tokens after it
    axes: tuple[str, ...]  # what each input axis is, for messages

    @property
    def token_axes(self) -> tuple[str, ...]:
        """The axes that hold tokens (besides batch): ("seq",), ("height", "width")..."""
        return tuple(a for a in self.axes if a not in ("batch", "dim"))

    @property
    def image(self) -> bool:
        """A feature map: two or more token axes after the feature axis (images, volumes); inputs
        of exactly this rank."""
        return len(self.token_axes) >= 2

    def describe(self) -> str:
        """The axes, for messages: "batch, seq, dim"."""
        return ", ".join(self.axes)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Accepted input ranks: sequences may also come as (batch, dim), one token per row."""
        return (len(self.axes),) if self.image else (2, 3)

    @property
    def feature_axis(self) -> int:
        return 1 if self.channel_first else -1

    def expected(self) -> str:
        """What an input of this layout looks like, for messages."""
        return self.describe() if self.image else f"{self.describe()} or batch, dim"

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """An input in this layout -> (batch, tokens, dim)."""
        if self.image:
            return x.flatten(2).transpose(1, 2)
        if x.ndim == 2:
            return x.unsqueeze(1)
        return x.transpose(1, 2) if self.channel_first else x

    def from_tokens(self, t: torch.Tensor, like_shape: torch.Size) -> torch.Tensor:
        """(batch, tokens, ...) -> this layout, shaped like the input of `like_shape` (inverse of `to_tokens`)."""
        if self.image:
            return t.transpose(1, 2).reshape(like_shape[0], t.shape[-1], *like_shape[2:])
        if len(like_shape) == 2:
            return t.squeeze(1)
        return t.transpose(1, 2) if self.channel_first else t

    def index_shape(self, like_shape: torch.Size) -> tuple[int, ...]:
        """Shape of the indices for an input of `like_shape` (before a trailing heads axis)."""
        if self.image:
            return (like_shape[0], *like_shape[2:])
        if len(like_shape) == 2:
            return (like_shape[0],)
        return (like_shape[0], like_shape[2] if self.channel_first else like_shape[1])

    def token_row_shape(self, tokens: int) -> tuple[int, ...]:
        """The token axes of an input holding `tokens` tokens in one row: (tokens,), (1, tokens)..."""
        return (*(1,) * (len(self.token_axes) - 1), tokens)


CHANNEL_LAST = Layout("b n d", channel_first=False, axes=("batch", "seq", "dim"))
CHANNEL_FIRST = Layout("b d n", channel_first=True, axes=("batch", "dim", "seq"))
IMAGE = Layout("b d h w", channel_first=True, axes=("batch", "dim", "height", "width"))
VOLUME = Layout("b d f h w", channel_first=True, axes=("batch", "dim", "depth", "height", "width"))
LAYOUTS = {layout.name: layout for layout in (CHANNEL_LAST, CHANNEL_FIRST, IMAGE, VOLUME)}
# Kinds whose indices are (stages, batch, seq) in the graph (a GroupedResidualVQ's: groups * stages).
RESIDUAL_KINDS = ("ResidualVQ", "GroupedResidualVQ", "SplitResidualVQ")


def layout_for(channel_last: bool, image: bool, volume: bool = False) -> Layout:
    """The layout of a module built with `channel_last` / `accept_image_fmap` / `accept_3d_fmap`."""
    if volume:
        return VOLUME
    if image:
        return IMAGE
    return CHANNEL_LAST if channel_last else CHANNEL_FIRST


def _permute(array: Any, order: tuple[int, ...]) -> Any:
    """Axes of a torch tensor or a numpy array in `order`."""
    return array.permute(*order) if isinstance(array, torch.Tensor) else array.transpose(order)


# Sizes of the example input an export traces: >= 2 on every dynamic axis (torch.export
# specialises sizes 0 and 1), distinct so that no two axes are taken for one.
EXAMPLE_SIZES = {"batch": 2, "seq": 3, "depth": 2, "height": 3, "width": 5}


@dataclass(frozen=True)
class QuantizerSpec:
    """A quantizer's I/O: what it takes and what it returns."""

    kind: str  # "VectorQuantize", "ResidualVQ", "GroupedResidualVQ"
    layout: Layout
    dim: int
    codebook_size: int  # the largest, where stages differ
    heads: int = 1
    num_quantizers: int = 1  # searches per token of a residual kind (a GroupedResidualVQ: groups * stages)
    conventions: str = "seed"  # index layout of a residual kind's API (the graph's is always the seed's)
    groups: int = 1  # GroupedResidualVQ
    index_bound: int | None = None  # the smallest codebook, where stages differ (random indices stay below it)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: Any) -> QuantizerSpec:
        """The spec of a quantizer module (each module builds its own: `module.spec`)."""
        return module.spec

    @classmethod
    def from_info(cls, info: Any) -> QuantizerSpec:
        """The spec an export's metadata (`ExportInfo`) stores."""
        from vqdeploy.errors import NotAVQDeployModelError

        if info.input_layout not in LAYOUTS:
            raise NotAVQDeployModelError(f"unknown input layout {info.input_layout!r} in the metadata; expected one of "
                                         f"{', '.join(LAYOUTS)}")
        residual = info.kind in RESIDUAL_KINDS
        conventions = info.config.get("conventions", "seed") if residual else "seed"
        groups = int(info.config.get("groups", 1)) if info.kind == "GroupedResidualVQ" else 1
        sizes = info.config.get("codebook_size")
        index_bound = min(sizes) if isinstance(sizes, list | tuple) and sizes else None
        return cls(info.kind, LAYOUTS[info.input_layout], info.dim, info.codebook_size, heads=info.heads,
                   num_quantizers=info.num_quantizers, conventions=conventions, groups=groups, index_bound=index_bound)

    def metadata_fields(self) -> dict[str, Any]:
        """The metadata keys this spec is stored as (the rest of `ExportInfo` describes the file)."""
        return dict(kind=self.kind, num_quantizers=self.num_quantizers, codebook_size=self.codebook_size,
                    dim=self.dim, heads=self.heads, input_layout=self.layout.name)

    # -- shapes --------------------------------------------------------------------------------------
    @property
    def residual(self) -> bool:
        """Indices (stages, batch, seq) in the graph."""
        return self.kind in RESIDUAL_KINDS

    @property
    def grouped(self) -> bool:
        return self.kind == "GroupedResidualVQ"

    @property
    def head_axis(self) -> tuple[int, ...]:
        """The trailing heads axis of indices, if any."""
        return (self.heads,) if self.heads > 1 else ()

    @property
    def smallest_codebook(self) -> int:
        return self.index_bound or self.codebook_size

    def input_shape(self, groups: int, tokens: int) -> tuple[int, ...]:
        """Vectors of `groups` inputs of `tokens` tokens each, in the layout (maps: one row of pixels)."""
        if self.layout.channel_first:
            return (groups, self.dim, *self.layout.token_row_shape(tokens))
        return (groups, tokens, self.dim)

    def graph_indices_shape(self, groups: int, tokens: int) -> tuple[int, ...]:
        """Indices as the graph takes and returns them (residual kinds: the seed's (stages, batch, seq))."""
        if self.residual:
            return (self.num_quantizers, groups, tokens)
        return (groups, *self.layout.token_row_shape(tokens), *self.head_axis)

    def indices_shape(self, groups: int, tokens: int) -> tuple[int, ...]:
        """Indices as the module's API (and the runtime's) takes and returns them."""
        if self.grouped:
            stages = self.num_quantizers // self.groups
            if self.conventions == "seed":
                return (self.groups, stages, groups, tokens)
            return (self.groups, groups, tokens, stages)
        if self.residual and self.conventions != "seed":
            return (groups, tokens, self.num_quantizers)
        return self.graph_indices_shape(groups, tokens)

    def rows_to_input(self, rows: Any) -> Any:
        """(T, dim) token rows (torch or numpy) -> one input of batch 1 in the layout."""
        if not self.layout.channel_first:
            return rows[None]
        return rows.T.reshape(1, self.dim, *self.layout.token_row_shape(-1))

    def token_major(self, indices: Any, tokens: int) -> Any:
        """Indices of `tokens` tokens as the API returns them -> (tokens, S): S searches (stages,
        groups x stages, heads) or 1, in the graph's order of searches."""
        if self.grouped and self.conventions != "seed":  # (g, b, n, q) -> (n, g, q)
            return _permute(indices.reshape(self.groups, tokens, -1), (1, 0, 2)).reshape(tokens, -1)
        if self.residual and self.conventions == "seed":
            return indices.reshape(self.num_quantizers, tokens).T
        return indices.reshape(tokens, -1)

    # -- export ----------------------------------------------------------------------------------------
    def example_input(self, part: str) -> torch.Tensor:
        """A small input of the part, with sizes >= 2 on every dynamic axis (`EXAMPLE_SIZES`)."""
        sizes = EXAMPLE_SIZES
        batch = sizes["batch"]
        token_sizes = tuple(sizes[a] for a in self.layout.token_axes)
        if part == "decode":
            if self.residual:
                return torch.randint(0, self.smallest_codebook, (self.num_quantizers, batch, sizes["seq"]))
            lead = (batch, *token_sizes) if self.layout.image else (batch, sizes["seq"])
            return torch.randint(0, self.smallest_codebook, (*lead, *self.head_axis))
        if self.layout.channel_first:
            return torch.randn(batch, self.dim, *token_sizes)
        return torch.randn(batch, sizes["seq"], self.dim)

    def dynamic_axis_names(self, part: str, ndim: int) -> dict[int, str]:
        """Axis -> name of the dynamic axes of the part's input of rank `ndim`."""
        if part == "decode":
            if self.residual:
                return {1: "batch", 2: "seq"}
            names = ("batch", *self.layout.token_axes)
            data_axes = ndim - len(self.head_axis)  # a trailing heads axis is static
            return dict(enumerate(names[: max(data_axes, 1)]))
        if ndim == 2:  # (batch, dim): one token per row
            return {0: "batch"}
        if self.layout.channel_first:
            return {0: "batch", **{2 + i: name for i, name in enumerate(self.layout.token_axes)}}
        return {0: "batch", 1: "seq"}


class CodecChannelFirst:
    """`spec` and `input_layout` of a codec's quantizer that takes (batch, dim, time), as the codec
    does (FactorizedResidualVQ, SplitResidualVQ): a mixin for modules with ``dim``,
    ``codebook_size`` and ``num_quantizers``."""

    @property
    def spec(self) -> QuantizerSpec:
        """What this module takes and returns (`vqdeploy.spec`): (batch, dim, time), as the codec."""
        return QuantizerSpec(type(self).__name__, CHANNEL_FIRST, self.dim, self.codebook_size,
                             num_quantizers=self.num_quantizers)

    @property
    def input_layout(self) -> str:
        return self.spec.layout.name
