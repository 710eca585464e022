"""The verdict on each served token and vector: identical, certified tie (`vqdeploy.ops.certify`,
the project's one tie rule) or violation, judged on the rows the eager model's search sees."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vqdeploy.errors import VQDeployError
from vqdeploy.nn import GroupedResidualVQ, ResidualVQ
from vqdeploy.nn.conventions import residual_indices_from_seed, residual_indices_to_seed
from vqdeploy.ops import certify, nearest_code
from vqdeploy.parity.report import StageReport, VectorReport


def stage_names(module: nn.Module) -> list[str]:
    if isinstance(module, GroupedResidualVQ):
        return [f"group {g} stage {s}" for g in range(module.groups) for s in range(module.num_quantizers)]
    if isinstance(module, ResidualVQ):
        return [f"stage {s}" for s in range(module.num_quantizers)]
    return [f"head {h}" for h in range(module.heads)] if module.heads > 1 else ["codebook"]


def search_codebook(module: nn.Module, search: int) -> torch.Tensor:
    """The eager (K, d) codebook of one search (a stage, or a head)."""
    if isinstance(module, ResidualVQ):
        return module.layers[search].codebook.detach()
    codebook = module.effective_codebook.detach()
    return codebook[search] if codebook.ndim == 3 else codebook


def new_stage_reports(module: nn.Module) -> list[StageReport]:
    """One empty `StageReport` per search of the module, named as the report names them."""
    names = stage_names(module)
    sizes = list(module.codebook_sizes) * getattr(module, "groups", 1) if hasattr(module, "codebook_sizes") else None
    return [StageReport(name, codebook_size=sizes[i] if sizes else module.codebook_size) for i, name in enumerate(names)]


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
    if isinstance(module, GroupedResidualVQ):  # each group as the ResidualVQ it is, on its slice of x
        if tuple(served.shape) != tuple(eager.shape):
            problems.append(f"indices of shape {tuple(served.shape)}, expected {tuple(eager.shape)}")
            for stage in stages:
                stage.tokens += eager[0].numel() // module.num_quantizers
                stage.violations += eager[0].numel() // module.num_quantizers
            return
        q = module.num_quantizers
        for g, (rvq, part) in enumerate(zip(module.rvqs, x.chunk(module.groups, dim=-1), strict=True)):
            check_tokens(rvq, part, eager[g], served[g], stages[g * q : (g + 1) * q], problems, identical_only)
        return
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
            codebook = search_codebook(module, s)
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
        codebook = search_codebook(module, h)
        _classify(stages[h], head_rows, codebook, per_head_eager[:, h], per_head_served[:, h], identical_only)


VECTOR_TOLERANCE = 1e-6  # relative: a runtime's own float32 arithmetic after (or inside) the codebook


def codes_computed_in_graph(module: nn.Module) -> bool:
    """Whether a search's codes are computed from the state rather than stored (1.32's affine_param:
    the codebook moved by tracked statistics, with a Sqrt and a Div a runtime rounds its own way;
    torch 2.13's float32 sqrt on an AMD EPYC is 1 ulp off for ~17% of values, ONNX Runtime's is not)."""
    layers = module.layers if isinstance(module, ResidualVQ) else [module]
    return any(getattr(layer, "has_affine_codebook", False) for layer in layers)


def check_vectors(module: nn.Module, got: torch.Tensor, indices: torch.Tensor, report: VectorReport) -> None:
    """Compare served vectors with the eager decode of ``indices`` (the served tokens), row by row."""
    if isinstance(module, GroupedResidualVQ):  # each group's slice of the vectors, with its indices
        got, indices = torch.as_tensor(got).cpu(), torch.as_tensor(indices).cpu()
        if got.shape[-1:] != (module.dim,) or indices.ndim != 4 or indices.shape[0] != module.groups:
            rows = max(1, got.numel() // module.dim)
            report.rows, report.violations = report.rows + rows, report.violations + rows
            report.max_abs_diff = report.max_rel_diff = float("inf")
            return
        for rvq, part, part_indices in zip(module.rvqs, got.chunk(module.groups, dim=-1), indices, strict=True):
            check_vectors(rvq, part, part_indices, report)
        return
    report.tolerance = VECTOR_TOLERANCE if module.has_projections or codes_computed_in_graph(module) else 0.0
    got = torch.as_tensor(got).cpu()
    indices = torch.as_tensor(indices).cpu()
    rvq = isinstance(module, ResidualVQ)
    try:
        indices = indices.long()
        limit: Any = module.codebook_size
        if rvq and not module.uniform_codebook_size and indices.ndim == 3:  # one size per stage
            sizes = torch.tensor(module.codebook_sizes)
            limit = residual_indices_from_seed(module.conventions, sizes[:, None, None].expand(-1, *indices.shape[1:])
                                               if module.conventions != "vector_quantize_pytorch"
                                               else sizes[:, None, None].expand(-1, *indices.shape[:2]))
        valid = (indices >= 0) & (indices < limit)
        if rvq:
            valid = valid | (indices == -1)  # a dropped stage decodes to zeros
        with torch.no_grad():
            want = module.get_output_from_indices(torch.where(valid, indices, torch.zeros_like(indices)))
    except (VQDeployError, RuntimeError):  # indices the eager model cannot decode: every row fails
        rows = max(1, got.numel() // module.dim)
        report.rows, report.violations = report.rows + rows, report.violations + rows
        report.max_abs_diff = report.max_rel_diff = float("inf")
        return
    channel_first = want.ndim > 2 and module.spec.layout.channel_first
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
