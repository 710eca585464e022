"""Token parity between the eager model and a backend (DESIGN.md section 4).

Every token a backend returns is classified, stage by stage (residual stages, or heads):

- identical: the backend's index equals the eager index;
- certified tie: it differs, but on the backend's own path (its own residual for later stages)
  the gap d(x, c_backend) - d(x, c_nearest) in float64 is within tau(x), the float32 rounding
  bound derived in `vqdeploy.ops.nearest_code` (module docstring, equation (2));
- violation: anything else. A report with any violation does not pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vqdeploy.errors import UnsupportedOptionError
from vqdeploy.export.metadata import read_metadata
from vqdeploy.nn import ResidualVQ, VectorQuantize, load_quantizer
from vqdeploy.nn.conventions import residual_indices_to_seed
from vqdeploy.ops.nearest_code import nearest_code, squared_distances64, tie_tolerance


@dataclass
class StageReport:
    stage: str
    tokens: int = 0
    identical: int = 0
    certified_ties: int = 0
    violations: int = 0
    worst_gap: float = 0.0  # largest float64 distance gap among differing tokens
    worst_gap_over_tau: float = 0.0  # the same gap divided by its tau (> 1 means violation)


@dataclass
class ParityReport:
    backend: str
    device: str
    precision: str
    part: str
    input_shapes: list[list[int]]
    stages: list[StageReport] = field(default_factory=list)
    max_abs_vector_diff: float = 0.0  # decoded vectors: backend vs eager decode of the same indices
    max_vector_rel_diff: float = 0.0  # the same, relative to max(1, |vector|): what is checked
    vector_tolerance: float = 1e-6

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    @property
    def identical(self) -> int:
        return sum(s.identical for s in self.stages)

    @property
    def certified_ties(self) -> int:
        return sum(s.certified_ties for s in self.stages)

    @property
    def violations(self) -> int:
        return sum(s.violations for s in self.stages)

    @property
    def vectors_ok(self) -> bool:
        return self.max_vector_rel_diff <= self.vector_tolerance

    @property
    def passed(self) -> bool:
        return self.violations == 0 and self.vectors_ok

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            passed=self.passed, tokens=self.tokens, identical=self.identical,
            certified_ties=self.certified_ties, violations=self.violations,
        )
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        rows = [("stage", "tokens", "identical", "certified ties", "violations", "worst gap / tau")]
        rows += [
            (s.stage, str(s.tokens), str(s.identical), str(s.certified_ties), str(s.violations), f"{s.worst_gap_over_tau:.3g}")
            for s in self.stages
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"{verdict}: backend={self.backend} device={self.device} precision={self.precision} part={self.part}; "
            f"{self.tokens} tokens, {self.identical} identical, {self.certified_ties} certified ties, "
            f"{self.violations} violations; max |vector diff| = {self.max_abs_vector_diff:.3g}, "
            f"relative {self.max_vector_rel_diff:.3g} "
            f"(tolerance {self.vector_tolerance:g}); input shapes {self.input_shapes}"
        )
        return "\n".join(lines)


# -- inputs -----------------------------------------------------------------------------------------
def _codebook_space_to_input(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Map codebook-space rows back to the input space (pseudo-inverse of project_in's Linear; a
    LayerNorm after it is not inverted: the rows only set the statistics of the sample inputs)."""
    project_in = module.project_in
    if isinstance(project_in, nn.Sequential) and isinstance(project_in[0], nn.Linear):
        project_in = project_in[0]
    if not isinstance(project_in, nn.Linear):
        return rows
    weight, bias = project_in.weight.detach().double(), project_in.bias.detach().double()
    return ((rows.double() - bias) @ torch.linalg.pinv(weight).T).float()


def _first_codebook(module: nn.Module) -> torch.Tensor:
    if isinstance(module, ResidualVQ):
        return module.layers[0].codebook.detach()
    codebook = module.codebook.detach()
    return codebook[0] if codebook.ndim == 3 else codebook


def _tokens_to_layout(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(T, dim) tokens -> one input in the module's layout (batch 1)."""
    if isinstance(module, ResidualVQ) or (module.channel_last and not module.accept_image_fmap):
        return tokens[None]
    if module.accept_image_fmap:
        return tokens.T.reshape(1, module.dim, 1, -1)
    return tokens.T[None]


def default_inputs(module: nn.Module, num_samples: int = 2048, seed: int = 0) -> list[torch.Tensor]:
    """A real-data sample (scikit-learn digits mapped to dim), random normal data, exact ties at
    midpoints between each code and its nearest other code, and graded near-ties around them."""
    generator = torch.Generator().manual_seed(seed)
    dim = module.dim
    codebook = _first_codebook(module)
    heads = 1 if isinstance(module, ResidualVQ) else module.heads
    per_head = codebook.shape[1]
    scale = codebook.std().item() or 1.0

    from sklearn.datasets import load_digits  # a package-shipped real data set

    digits = torch.from_numpy(load_digits().data.astype(np.float32))
    digits = digits[torch.randperm(len(digits), generator=generator)[:num_samples]]
    real = digits.repeat(1, -(-dim // digits.shape[1]))[:, :dim]
    # Matched to the codebook's per-dimension statistics, so the sample lands where codes are.
    target = _codebook_space_to_input(module, codebook.repeat(1, heads)) if heads * per_head != dim or isinstance(
        module.project_in, nn.Linear | nn.Sequential) else codebook
    real = (real - real.mean(0)) / (real.std(0) + 1e-6) * target.std(0) + target.mean(0)

    random = torch.randn(num_samples, dim, generator=generator) * scale

    # Midpoints between every code and its nearest neighbour, tiled over heads, plus tiny noise.
    distances = torch.cdist(codebook.double(), codebook.double())
    distances.fill_diagonal_(float("inf"))
    neighbours = distances.argmin(dim=1)
    midpoints = (codebook + codebook[neighbours]) / 2
    picks = torch.randint(0, len(midpoints), (num_samples, heads), generator=generator)
    rows = midpoints[picks].reshape(num_samples, heads * per_head)
    exact_ties = _codebook_space_to_input(module, rows)
    # Graded near-ties: moved from the midpoint towards one code by a relative offset delta, log-uniform
    # in [1e-8, 1e-2]: the gap is 4 delta h^2 (h = half the code distance), so a backend whose
    # distances err by more than float32 rounding flips some of them and shows as violations.
    delta = 10 ** (torch.rand(num_samples, heads, 1, generator=generator) * 6 - 8)
    towards = (codebook - codebook[neighbours])[picks] / 2
    graded = _codebook_space_to_input(module, (midpoints[picks] + delta * towards).reshape(num_samples, -1))
    return [_tokens_to_layout(module, t) for t in (real, random, exact_ties, graded)]


# -- classification ------------------------------------------------------------------------------------
def classify_tokens(
    rows: torch.Tensor, codebook: torch.Tensor, eager: torch.Tensor, backend: torch.Tensor, stage: str = "codebook"
) -> StageReport:
    """Classify one search's tokens: rows (M, d) in codebook space, codebook (K, d), indices (M,)."""
    report = StageReport(stage)
    _classify(report, rows, codebook, eager, backend)
    return report


def _classify(stage: StageReport, rows: torch.Tensor, codebook: torch.Tensor, eager: torch.Tensor, backend: torch.Tensor) -> None:
    """Fold one stage's tokens into `stage`. rows (M, d) are the backend path's stage inputs."""
    stage.tokens += len(backend)
    stage.identical += int((backend == eager).sum())
    differ = backend != eager
    if not bool(differ.any()):
        return
    rows, eager_here = rows[differ], nearest_code(rows[differ], codebook)
    chosen = backend[differ]
    gap = squared_distances64(rows, codebook, chosen) - squared_distances64(rows, codebook, eager_here)
    tau = tie_tolerance(rows, codebook, eager_here, chosen)
    ok = gap <= tau
    stage.certified_ties += int(ok.sum())
    stage.violations += int((~ok).sum())
    stage.worst_gap = max(stage.worst_gap, float(gap.max()))
    stage.worst_gap_over_tau = max(stage.worst_gap_over_tau, float((gap / tau).max()))


def _check_vector_quantize(module: VectorQuantize, x: torch.Tensor, eager: torch.Tensor, backend: torch.Tensor, stages: list[StageReport]) -> None:
    tokens = module._to_tokens(x)
    rows = module._codebook.transform_input(module._split_heads(module.project_in(tokens))).float()
    b, n = tokens.shape[:2]
    shaped_eager, shaped_backend = eager.reshape(b, n, module.heads), backend.reshape(b, n, module.heads)
    codebook = module._codebook.embed.detach()
    for h in range(module.heads):
        stage = stages[h]
        if module.separate_codebook_per_head:
            _classify(stage, rows[h], codebook[h], shaped_eager[..., h].reshape(-1), shaped_backend[..., h].reshape(-1))
        else:
            per_head = rows[0].reshape(b * n, module.heads, -1)[:, h]
            _classify(stage, per_head, codebook[0], shaped_eager[..., h].reshape(-1), shaped_backend[..., h].reshape(-1))


def _check_residual(module: ResidualVQ, x: torch.Tensor, eager: torch.Tensor, backend: torch.Tensor, stages: list[StageReport]) -> None:
    eager = residual_indices_to_seed(module.conventions, eager)  # both in the module's layout -> (q, b, n)
    backend = residual_indices_to_seed(module.conventions, backend)
    residual = module.project_in(x).reshape(-1, module.codebook_dim)
    for s, layer in enumerate(module.layers):
        codebook = layer.codebook.detach()
        chosen = backend[s].reshape(-1)
        rows = layer._codebook.transform_input(residual).float()
        _classify(stages[s], rows, codebook, eager[s].reshape(-1), chosen)
        residual = residual - codebook[chosen.clamp(min=0)]  # the backend's own path


def _stage_names(module: nn.Module) -> list[str]:
    if isinstance(module, ResidualVQ):
        return [f"stage {s}" for s in range(module.num_quantizers)]
    return [f"head {h}" for h in range(module.heads)] if module.heads > 1 else ["codebook"]


# -- entry point -------------------------------------------------------------------------------------------
def verify(
    model: nn.Module | str | os.PathLike,
    onnx_path: str | os.PathLike,
    *,
    backend: str = "ort",
    device: str = "cpu",
    precision: str = "exact",
    inputs: list[Any] | Any | None = None,
    num_samples: int = 2048,
    seed: int = 0,
    **load_options: Any,
) -> ParityReport:
    """Run the eager quantizer and `backend` on the same inputs and classify every token.

    `model` is a VectorQuantize / ResidualVQ or the path of a vqdeploy checkpoint. `inputs` are
    arrays in the module's input layout (numpy or torch); by default a real-data sample, random
    data and near-tie inputs (`default_inputs`).
    """
    from vqdeploy import runtime

    module = load_quantizer(model) if isinstance(model, str | os.PathLike) else model
    if not isinstance(module, VectorQuantize | ResidualVQ):
        raise UnsupportedOptionError(f"verify takes a VectorQuantize or ResidualVQ (or its checkpoint), got {type(module).__name__}")
    was_training = module.training
    module.eval()
    info = read_metadata(onnx_path)
    if info.kind != type(module).__name__:
        raise UnsupportedOptionError(f"{onnx_path} holds a {info.kind} export, but the model is a {type(module).__name__}")

    if inputs is None:
        inputs = default_inputs(module, num_samples, seed)
    elif not isinstance(inputs, list | tuple):
        inputs = [inputs]
    inputs = [torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float() for x in inputs]

    report = ParityReport(backend=backend, device=device, precision=precision, part=info.part,
                          input_shapes=[list(x.shape) for x in inputs])
    report.stages = [StageReport(name) for name in _stage_names(module)]
    try:
        with runtime.load(onnx_path, backend=backend, device=device, precision=precision, **load_options) as quantizer, torch.no_grad():
            report.backend = quantizer.backend
            for x in inputs:
                _compare_one(module, quantizer, info.part, x, report)
    finally:
        module.train(was_training)
    return report


def _compare_one(module: nn.Module, quantizer: Any, part: str, x: torch.Tensor, report: ParityReport) -> None:
    eager_vectors, eager_indices, _ = module(x)
    if part == "decode":
        vectors = quantizer.decode(eager_indices.to(quantizer.device)).cpu()
        _update_vector_diff(report, vectors, eager_vectors)
        return
    if part == "quantize":
        vectors, indices = quantizer.quantize(x.to(quantizer.device))
        vectors, indices = vectors.cpu(), indices.cpu()
    else:
        indices = quantizer.encode(x.to(quantizer.device)).cpu()
        vectors = None
    if isinstance(module, ResidualVQ):
        _check_residual(module, x, eager_indices, indices, report.stages)
    else:
        _check_vector_quantize(module, x, eager_indices, indices, report.stages)
    if vectors is not None:
        # Where tokens are identical, vectors are codebook rows and must match; elsewhere compare
        # the backend's vectors with the eager decode of the backend's own indices.
        _update_vector_diff(report, vectors, module.get_output_from_indices(indices))


def _update_vector_diff(report: ParityReport, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.abs().max().item() if want.numel() else 1.0)
    report.max_abs_vector_diff = max(report.max_abs_vector_diff, diff)
    report.max_vector_rel_diff = max(report.max_vector_rel_diff, diff / scale)


def save_report(report: ParityReport, path: str | os.PathLike) -> Path:
    from vqdeploy.files import atomic_write

    return atomic_write(path, lambda tmp: tmp.write_text(report.to_json()), overwrite=True)
