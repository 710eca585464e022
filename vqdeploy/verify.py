"""Token parity between the eager model and a backend (the parity rule of README "Verify").

What is proven, for every input verify runs:

- **Tokens.** Each search (a residual stage, or a head) is checked on the rows that the *eager*
  model's codebooks give for the backend's earlier tokens (`ResidualVQ.search_rows`), so a stage
  is judged on its own input even after an earlier stage took another code of a tie. Every served
  token is classified with the project's one tie rule, `vqdeploy.ops.certify`, against the eager
  model's codebook: *identical* (the eager model's token on those rows), *certified tie* (another
  code within the float32 rounding bound tau of the float64 nearest), or *violation*.
- **Vectors.** Every served vector (``quantize`` and ``decode`` exports) is compared with the eager
  model's decode of the served tokens: bit for bit where no projection follows the codebook, within
  1e-6 relative (to max(1, |row|)) where one does. Any other difference is a violation.
- **Layout.** Indices of another shape than the eager model's (a dropped stage, a missing head)
  are a violation of every token the backend failed to serve, never a crash.

The inputs decide which codes are exercised, so by default verify builds, for every search, probes
that put that search's rows exactly on every code, exactly between each code and its nearest
neighbour, and at graded distances from those midpoints (`default_inputs`); ``decode`` exports are
also asked for every code of every stage. A tampered code, a swapped pair, a dropped or duplicated
stage, a rounded codebook or MatMul, or a changed projection then serves other tokens or vectors
somewhere, and the report fails. The table's "codes" column says how many codes each search's
eager tokens reached.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vqdeploy.errors import BackendOutputError, UnsupportedOptionError, VQDeployError
from vqdeploy.export.metadata import read_metadata
from vqdeploy.nn import ResidualVQ, VectorQuantize, load_quantizer
from vqdeploy.nn.conventions import residual_indices_from_seed, residual_indices_to_seed
from vqdeploy.ops.nearest_code import certify, nearest_code

CRITERION_CERTIFIED = "certified ties"  # differing tokens pass when within the float32 bound
CRITERION_IDENTICAL = "identical"  # vqdeploy's own exact search: every token must be the eager one


@dataclass
class StageReport:
    stage: str
    tokens: int = 0
    identical: int = 0
    certified_ties: int = 0
    violations: int = 0
    worst_gap: float = 0.0  # largest float64 distance gap among differing tokens
    worst_gap_over_tau: float = 0.0  # the same gap divided by its tau (> 1 means violation)
    codes_exercised: int = 0  # distinct codes among the eager tokens of this search
    codebook_size: int = 0
    _seen: set[int] = field(default_factory=set, repr=False)


@dataclass
class VectorReport:
    rows: int = 0  # vectors compared
    violations: int = 0  # vectors that differ from the eager decode of the served tokens
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0  # relative to max(1, |row|)
    tolerance: float = 0.0  # relative; 0 where no projection follows the codebook


@dataclass
class ParityReport:
    backend: str
    device: str
    precision: str
    part: str
    input_shapes: list[list[int]]
    criterion: str = CRITERION_CERTIFIED
    stages: list[StageReport] = field(default_factory=list)
    vectors: VectorReport = field(default_factory=VectorReport)
    problems: list[str] = field(default_factory=list)  # layout violations, named

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

    # Kept for callers of the earlier report (vectors now have a section of their own).
    @property
    def max_abs_vector_diff(self) -> float:
        return self.vectors.max_abs_diff

    @property
    def max_vector_rel_diff(self) -> float:
        return self.vectors.max_rel_diff

    @property
    def vector_tolerance(self) -> float:
        return self.vectors.tolerance

    @property
    def vectors_ok(self) -> bool:
        return self.vectors.violations == 0

    @property
    def passed(self) -> bool:
        return self.violations == 0 and self.vectors_ok and not self.problems

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for stage in data["stages"]:
            stage.pop("_seen", None)
        data.update(
            passed=self.passed, tokens=self.tokens, identical=self.identical,
            certified_ties=self.certified_ties, violations=self.violations,
            max_abs_vector_diff=self.max_abs_vector_diff, max_vector_rel_diff=self.max_vector_rel_diff,
            vector_tolerance=self.vector_tolerance,
        )
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        rows = [("stage", "tokens", "identical", "certified ties", "violations", "worst gap / tau", "codes")]
        rows += [
            (s.stage, str(s.tokens), str(s.identical), str(s.certified_ties), str(s.violations),
             f"{s.worst_gap_over_tau:.3g}", f"{s.codes_exercised}/{s.codebook_size}")
            for s in self.stages
        ]
        v = self.vectors
        if v.rows:
            rows.append(("vectors", str(v.rows), str(v.rows - v.violations), "-", str(v.violations),
                         f"max diff {v.max_abs_diff:.3g}", "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"violation: {problem}" for problem in self.problems]
        for s in self.stages:
            if s.violations:
                lines.append(
                    f"violation: {s.stage}: {s.violations} tokens are not the eager model's nor a certified tie "
                    f"(worst gap {s.worst_gap:.3g} = {s.worst_gap_over_tau:.3g} tau)"
                )
        if v.violations:
            lines.append(
                f"violation: vectors: {v.violations} of {v.rows} differ from the eager decode of the served tokens "
                f"(max |diff| {v.max_abs_diff:.3g}, relative {v.max_rel_diff:.3g}, tolerance {v.tolerance:g})"
            )
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"{verdict}: backend={self.backend} device={self.device} precision={self.precision} part={self.part}; "
            f"criterion: {self.criterion}; {self.tokens} tokens, {self.identical} identical, "
            f"{self.certified_ties} certified ties, {self.violations} violations; "
            f"{v.rows} vectors, {v.violations} differ; {len(self.input_shapes)} inputs"
        )
        return "\n".join(lines)


# -- searches ---------------------------------------------------------------------------------------
def _stage_names(module: nn.Module) -> list[str]:
    if isinstance(module, ResidualVQ):
        return [f"stage {s}" for s in range(module.num_quantizers)]
    return [f"head {h}" for h in range(module.heads)] if module.heads > 1 else ["codebook"]


def _search_codebook(module: nn.Module, search: int) -> torch.Tensor:
    """The eager (K, d) codebook of one search (a stage, or a head)."""
    if isinstance(module, ResidualVQ):
        return module.layers[search].codebook.detach()
    codebook = module.codebook.detach()
    return codebook[search] if codebook.ndim == 3 else codebook


def new_stage_reports(module: nn.Module) -> list[StageReport]:
    """One empty `StageReport` per search of the module, named as the report names them."""
    names = _stage_names(module)
    return [StageReport(name, codebook_size=module.codebook_size) for name in names]


# -- inputs -----------------------------------------------------------------------------------------
def _codebook_space_to_input(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Map codebook-space rows back to the input space (pseudo-inverse of project_in's Linear; a
    LayerNorm after it is not inverted: the rows only set the statistics of the sample inputs)."""
    project_in = module.project_in
    if isinstance(project_in, nn.Sequential) and isinstance(project_in[0], nn.Linear):
        project_in = project_in[0]
    if not isinstance(project_in, nn.Linear):
        return rows.float()
    weight, bias = project_in.weight.detach().double(), project_in.bias.detach().double()
    return ((rows.double() - bias) @ torch.linalg.pinv(weight).T).float()


def _tokens_to_layout(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(T, dim) tokens -> one input in the module's layout (batch 1)."""
    if isinstance(module, ResidualVQ) or (module.channel_last and not module.accept_image_fmap):
        return tokens[None]
    if module.accept_image_fmap:
        return tokens.T.reshape(1, module.dim, 1, -1)
    return tokens.T[None]


def _probe_targets(codebook: torch.Tensor, num_graded: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Rows for one search: [exact midpoints, graded near-ties, on every code, spread], shuffled.

    Midpoints lie halfway between each code and its nearest other code (an exact tie in exact
    arithmetic). Graded near-ties move from such a midpoint towards one code by a relative
    offset delta, log-uniform in [1e-8, 1e-2]: the gap is 4 delta h^2 (h = half the distance of
    the pair), so distances that err by more than float32 rounding flip some and show as
    violations. On-code rows sit exactly on each code, so a changed or moved code is served
    differently (another token, or another vector).
    """
    codebook = codebook.detach().float()
    num_codes = codebook.shape[0]
    distances = torch.cdist(codebook.double(), codebook.double())
    distances.fill_diagonal_(float("inf"))
    neighbours = distances.argmin(dim=1) if num_codes > 1 else torch.zeros(1, dtype=torch.long)
    midpoints = (codebook + codebook[neighbours]) / 2
    picks = torch.randint(0, num_codes, (num_graded,), generator=generator)
    delta = 10 ** (torch.rand(num_graded, 1, generator=generator) * 6 - 8)
    graded = midpoints[picks] + delta * (codebook[picks] - codebook[neighbours[picks]]) / 2
    on_code = codebook.clone()
    # Spread: normal rows at the codebook's mean and twice its per-dimension spread, so codes that a
    # tampered file moved away from every eager probe are still the nearest somewhere.
    spread = codebook.mean(0) + 2 * codebook.std(0, unbiased=False) * torch.randn(num_graded, codebook.shape[1], generator=generator)
    return [t[torch.randperm(t.shape[0], generator=generator)] for t in (midpoints, graded, on_code, spread)]


def _residual_probe(module: ResidualVQ, stage: int, targets: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Codebook-space inputs whose eager residual at ``stage`` is ``targets`` (fixed point of
    r = reconstruction_{<stage}(r) + target, from r = base + target; three rounds suffice in
    practice, and a row that does not settle is still a valid input)."""
    rows = base[: targets.shape[0]] + targets
    for _ in range(3):
        residual, reconstruction = rows.clone(), torch.zeros_like(rows)
        for layer in module.layers[:stage]:
            codes = layer.codebook.detach()[nearest_code(layer._codebook.transform_input(residual).float(), layer.codebook.detach())]
            reconstruction += codes
            residual -= codes
        rows = reconstruction + targets
    return rows


def default_inputs(module: nn.Module, num_samples: int = 2048, seed: int = 0) -> list[torch.Tensor]:
    """verify's inputs: a real-data sample (scikit-learn digits mapped to dim), random normal data,
    then, for every search (each residual stage; all heads at once), its exact midpoints, graded
    near-ties, on-code and spread probes (`_probe_targets`). The first search's midpoints are ``[2]``."""
    generator = torch.Generator().manual_seed(seed)
    dim = module.dim
    codebook = _search_codebook(module, 0)
    scale = codebook.std().item() or 1.0

    from sklearn.datasets import load_digits  # a package-shipped real data set

    digits = torch.from_numpy(load_digits().data.astype(np.float32))
    digits = digits[torch.randperm(len(digits), generator=generator)[:num_samples]]
    real = digits.repeat(1, -(-dim // digits.shape[1]))[:, :dim]
    # Matched to the input-space image of the first codebook, so the sample lands where codes are.
    heads = 1 if isinstance(module, ResidualVQ) else module.heads
    target = _codebook_space_to_input(module, codebook.repeat(1, heads)[:, : heads * codebook.shape[1]])
    real = (real - real.mean(0)) / (real.std(0) + 1e-6) * target.std(0) + target.mean(0)
    random = torch.randn(num_samples, dim, generator=generator) * scale
    inputs = [real, random]

    if isinstance(module, ResidualVQ):
        base = module.project_in(real).detach()
        for stage in range(module.num_quantizers):
            for targets in _probe_targets(_search_codebook(module, stage), num_samples, generator):
                wide = base.repeat(-(-targets.shape[0] // base.shape[0]), 1)
                inputs.append(_codebook_space_to_input(module, _residual_probe(module, stage, targets, wide)))
    else:
        searches = module.heads if module.separate_codebook_per_head else 1
        per_head = [_probe_targets(_search_codebook(module, h % searches), num_samples, generator) for h in range(module.heads)]
        for kind in range(4):  # midpoints, graded, on-code, spread: every head probed at once
            rows = torch.cat([per_head[h][kind] for h in range(module.heads)], dim=1)
            inputs.append(_codebook_space_to_input(module, rows))
    return [_tokens_to_layout(module, t) for t in inputs]


def decode_probes(module: nn.Module) -> torch.Tensor:
    """Indices that ask a decode export for every code of every search (in the module's layout)."""
    k = module.codebook_size
    if isinstance(module, ResidualVQ):
        generator = torch.Generator().manual_seed(0)
        probes = torch.stack([torch.randperm(k, generator=generator) for _ in range(module.num_quantizers)])[:, None]
        return residual_indices_from_seed(module.conventions, probes)
    codes = torch.arange(k)
    if module.heads > 1:
        codes = torch.stack([torch.roll(codes, h) for h in range(module.heads)], dim=-1)
    codes = codes[None]
    return codes[:, None] if module.accept_image_fmap else codes


# -- classification ------------------------------------------------------------------------------------
def classify_tokens(
    rows: torch.Tensor, codebook: torch.Tensor, eager: torch.Tensor, backend: torch.Tensor, stage: str = "codebook"
) -> StageReport:
    """Classify one search's tokens: rows (M, d) in codebook space, codebook (K, d), indices (M,)."""
    report = StageReport(stage, codebook_size=codebook.shape[0])
    _classify(report, rows, codebook, eager.reshape(-1), backend.reshape(-1))
    return report


def _classify(
    stage: StageReport, rows: torch.Tensor, codebook: torch.Tensor, expected: torch.Tensor, served: torch.Tensor,
    identical_only: bool = False,
) -> None:
    """Fold one search's tokens into ``stage``: ``expected`` is the eager model's token on ``rows``.
    With ``identical_only`` (criterion "identical") a certified tie counts as a violation."""
    stage.tokens += len(served)
    stage._seen.update(torch.unique(expected).tolist())
    stage.codes_exercised = len(stage._seen)
    same = served == expected
    stage.identical += int(same.sum())
    if bool(same.all()):
        return
    certificate = certify(rows[~same], codebook, served[~same])
    ok = certificate.certified & (not identical_only)
    stage.certified_ties += int(ok.sum())
    stage.violations += int((~ok).sum())
    stage.worst_gap = max(stage.worst_gap, float(certificate.gap.max()))
    stage.worst_gap_over_tau = max(stage.worst_gap_over_tau, certificate.worst_gap_over_tau)


def _expected(rows: torch.Tensor, codebook: torch.Tensor, eager: torch.Tensor, diverged: torch.Tensor) -> torch.Tensor:
    """The eager token on ``rows``: the eager model's own where its path is the backend's, else
    the eager search on the backend's rows."""
    expected = eager.clone()
    if bool(diverged.any()):
        expected[diverged] = nearest_code(rows[diverged], codebook)
    return expected


def check_tokens(
    module: nn.Module, x: torch.Tensor, eager: torch.Tensor, served: torch.Tensor,
    stages: list[StageReport], problems: list[str], identical_only: bool = False,
) -> None:
    """Classify every served token of one input into ``stages``; layout faults go to ``problems``."""
    served = torch.as_tensor(served).cpu()
    if served.is_floating_point() or served.dtype == torch.bool:
        problems.append(f"indices of dtype {served.dtype}, expected an integer dtype")
        for stage in stages:
            stage.tokens += eager.numel() // len(stages)
            stage.violations += eager.numel() // len(stages)
        return
    served = served.long()
    if isinstance(module, ResidualVQ):
        # Both in the module's layout; judged as (quantizer, batch, seq).
        eager = residual_indices_to_seed(module.conventions, eager)
        if served.ndim == 3:
            served = residual_indices_to_seed(module.conventions, served)
        q = module.num_quantizers
        if served.ndim != 3 or tuple(served.shape[1:]) != tuple(eager.shape[1:]) or served.shape[0] > q:
            problems.append(f"indices of shape {tuple(served.shape)}, expected {tuple(eager.shape)} (quantizer, batch, seq)")
            for stage in stages:
                stage.tokens += eager[0].numel()
                stage.violations += eager[0].numel()
            return
        if served.shape[0] < q:
            problems.append(f"stages {served.shape[0]}..{q - 1} missing: indices of shape {tuple(served.shape)}, expected {tuple(eager.shape)}")
            for stage in stages[served.shape[0]:]:
                stage.tokens += eager[0].numel()
                stage.violations += eager[0].numel()
        padded = torch.cat([served, eager[served.shape[0]:]]) if served.shape[0] < q else served
        rows = module.search_rows(x, padded)
        diverged = torch.zeros(eager[0].numel(), dtype=torch.bool)
        for s in range(served.shape[0]):
            codebook = _search_codebook(module, s)
            expected = _expected(rows[s], codebook, eager[s].reshape(-1), diverged)
            got = served[s].reshape(-1)
            _classify(stages[s], rows[s], codebook, expected, got, identical_only)
            diverged |= got != eager[s].reshape(-1)
        return
    if tuple(served.shape) != tuple(eager.shape):
        problems.append(f"indices of shape {tuple(served.shape)}, expected {tuple(eager.shape)}")
        for stage in stages:
            stage.tokens += eager.numel() // module.heads
            stage.violations += eager.numel() // module.heads
        return
    rows = module.search_rows(x)  # (H, M, d)
    per_head_eager = eager.reshape(-1, module.heads)
    per_head_served = served.reshape(-1, module.heads)
    for h in range(module.heads):
        head_rows = rows[h] if module.separate_codebook_per_head else rows[0].reshape(-1, module.heads, rows.shape[-1])[:, h]
        codebook = _search_codebook(module, h)
        _classify(stages[h], head_rows, codebook, per_head_eager[:, h], per_head_served[:, h], identical_only)


def check_vectors(module: nn.Module, got: torch.Tensor, indices: torch.Tensor, report: VectorReport) -> None:
    """Compare served vectors with the eager decode of ``indices`` (the served tokens), row by row."""
    report.tolerance = 1e-6 if module.has_projections else 0.0
    got = torch.as_tensor(got).cpu()
    indices = torch.as_tensor(indices).cpu()
    rvq = isinstance(module, ResidualVQ)
    try:
        indices = indices.long()
        valid = (indices >= 0) & (indices < module.codebook_size)
        if rvq:
            valid = valid | (indices == -1)  # a dropped stage decodes to zeros
        with torch.no_grad():
            want = module.get_output_from_indices(torch.where(valid, indices, torch.zeros_like(indices)))
    except (VQDeployError, RuntimeError):  # indices the eager model cannot decode: every row fails
        rows = max(1, got.numel() // module.dim)
        report.rows, report.violations = report.rows + rows, report.violations + rows
        report.max_abs_diff = report.max_rel_diff = float("inf")
        return
    channel_first = want.ndim > 2 and (not module.channel_last or not rvq and module.accept_image_fmap)
    if channel_first:
        want = want.movedim(1, -1)
        got = got.movedim(1, -1) if got.ndim == want.ndim else got
    want = want.reshape(-1, module.dim).float()
    if got.shape[-1:] != (module.dim,) or got.numel() != want.numel():
        report.rows, report.violations = report.rows + want.shape[0], report.violations + want.shape[0]
        report.max_abs_diff = report.max_rel_diff = float("inf")
        return
    got = got.reshape(-1, module.dim).float()
    if rvq:
        row_valid = residual_indices_to_seed(module.conventions, valid).all(dim=0).reshape(-1)
    else:
        row_valid = valid.reshape(-1, module.heads).all(dim=1)
    diff = (got - want).abs().amax(dim=1) if want.numel() else torch.zeros(0)
    rel = diff / want.abs().amax(dim=1).clamp(min=1.0) if want.numel() else torch.zeros(0)
    bad = ~(rel <= report.tolerance) | ~row_valid  # NaN differences are violations too
    report.rows += want.shape[0]
    report.violations += int(bad.sum())
    if diff.numel():
        report.max_abs_diff = max(report.max_abs_diff, float(diff.nan_to_num(nan=float("inf")).max()))
        report.max_rel_diff = max(report.max_rel_diff, float(rel.nan_to_num(nan=float("inf")).max()))


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
    """Run the eager quantizer and ``backend`` on the same inputs and classify every token and vector.

    ``model`` is a VectorQuantize / ResidualVQ or the path of a vqdeploy checkpoint. ``inputs`` are
    arrays in the module's input layout (numpy or torch), or indices for a decode export; by
    default `default_inputs` (and `decode_probes` for decode exports).
    """
    from vqdeploy import runtime

    module = load_quantizer(model) if isinstance(model, str | os.PathLike) else model
    if not isinstance(module, VectorQuantize | ResidualVQ):
        raise UnsupportedOptionError(f"verify takes a VectorQuantize or ResidualVQ (or its checkpoint), got {type(module).__name__}")
    info = read_metadata(onnx_path)
    if info.kind != type(module).__name__:
        raise UnsupportedOptionError(f"{onnx_path} holds a {info.kind} export, but the model is a {type(module).__name__}")

    was_training = module.training
    module.eval()
    try:
        if inputs is None:
            inputs = default_inputs(module, num_samples, seed)
            if isinstance(module, ResidualVQ) and not module.channel_last:  # (b, n, d) probes, channel-first
                inputs = [x.transpose(1, 2) for x in inputs]
            if info.part == "decode":
                with torch.no_grad():
                    inputs = [module(x)[1] for x in inputs] + [decode_probes(module)]
        elif not isinstance(inputs, list | tuple):
            inputs = [inputs]
        inputs = [torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x) for x in inputs]
        if info.part != "decode":
            inputs = [x.float() for x in inputs]

        report = ParityReport(backend=backend, device=device, precision=precision, part=info.part,
                              input_shapes=[list(x.shape) for x in inputs])

        report.stages = new_stage_reports(module)
        with runtime.load(onnx_path, backend=backend, device=device, precision=precision, **load_options) as quantizer, torch.no_grad():
            report.backend = quantizer.backend
            if _exact_like_eager(module, quantizer):
                report.criterion = CRITERION_IDENTICAL
            for x in inputs:
                _compare_one(module, quantizer, info.part, x, report)
    finally:
        module.train(was_training)
    return report


def _exact_like_eager(module: nn.Module, quantizer: Any) -> bool:
    """Whether the backend runs vqdeploy's exact search on the rows the eager model computes.

    The torch backend on CPU does; ONNX Runtime does with the re-check body (`recheck_outputs`)
    where the search's rows are the input itself or reshapes and residuals of it (no projection or
    normalisation, whose float32 results may differ between runtimes). Those are held to identity;
    every other path (TensorRT, CUDA, ONNX Runtime without the re-check) to certified ties.
    """
    cosine = module.use_cosine_sim if isinstance(module, VectorQuantize) else module.layers[0].use_cosine_sim
    plain_rows = isinstance(module.project_in, nn.Identity) and not cosine
    if quantizer.backend == "torch":
        return quantizer.search_is_exact
    return quantizer.backend == "ort" and plain_rows and quantizer.search_is_exact


def _compare_one(module: nn.Module, quantizer: Any, part: str, x: torch.Tensor, report: ParityReport) -> None:
    try:
        _compare_outputs(module, quantizer, part, x, report)
    except BackendOutputError as error:  # a graph whose outputs do not fit the model: nothing it served counts
        if str(error) not in report.problems:
            report.problems.append(str(error))
        if part == "decode":
            rows = x.numel() // (module.num_quantizers if isinstance(module, ResidualVQ) else module.heads)
            report.vectors.rows += rows
            report.vectors.violations += rows
            return
        eager = module(x)[1]
        tokens = eager[0].numel() if isinstance(module, ResidualVQ) else eager.numel() // module.heads
        for stage in report.stages:
            stage.tokens += tokens
            stage.violations += tokens


def _compare_outputs(module: nn.Module, quantizer: Any, part: str, x: torch.Tensor, report: ParityReport) -> None:
    if part == "decode":
        vectors = quantizer.decode(x.to(quantizer.device)).cpu()
        check_vectors(module, vectors, x, report.vectors)
        return
    _, eager_indices, _ = module(x)
    if part == "quantize":
        vectors, indices = quantizer.quantize(x.to(quantizer.device))
        vectors, indices = vectors.cpu(), indices.cpu()
    else:
        indices, vectors = quantizer.encode(x.to(quantizer.device)).cpu(), None
    check_tokens(module, x, eager_indices, indices, report.stages, report.problems,
                 identical_only=report.criterion == CRITERION_IDENTICAL)
    if vectors is not None:
        check_vectors(module, vectors, indices, report.vectors)
