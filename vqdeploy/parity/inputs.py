"""verify's default inputs: real data, random data, and per-search probes on, between and near
every code (`default_inputs`), and indices that ask a decode export for every code (`decode_probes`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vqdeploy.nn import GroupedResidualVQ, ResidualVQ
from vqdeploy.nn.conventions import residual_indices_from_seed
from vqdeploy.ops import nearest_code
from vqdeploy.parity.classify import search_codebook


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
            codes = layer.codebook.detach()[nearest_code(layer.search_rows(residual)[0], layer.codebook.detach())]
            reconstruction += codes
            residual -= codes
        rows = reconstruction + targets
    return rows


def default_inputs(module: nn.Module, num_samples: int = 2048, seed: int = 0) -> list[torch.Tensor]:
    """verify's inputs: a real-data sample (scikit-learn digits mapped to dim), random normal data,
    then, for every search (each residual stage; all heads at once), its exact midpoints, graded
    near-ties, on-code and spread probes (`_probe_targets`). The first search's midpoints are ``[2]``.
    A GroupedResidualVQ's inputs put each group's own probes side by side on the feature axis."""
    if isinstance(module, GroupedResidualVQ):
        per_group = [default_inputs(rvq, num_samples, seed + g) for g, rvq in enumerate(module.rvqs)]
        joined = []
        for parts in zip(*per_group, strict=True):
            rows = min(part.shape[1] for part in parts)
            joined.append(torch.cat([part[:, :rows] for part in parts], dim=-1))
        return joined
    generator = torch.Generator().manual_seed(seed)
    dim = module.dim
    codebook = search_codebook(module, 0)
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
            for targets in _probe_targets(search_codebook(module, stage), num_samples, generator):
                wide = base.repeat(-(-targets.shape[0] // base.shape[0]), 1)
                inputs.append(_codebook_space_to_input(module, _residual_probe(module, stage, targets, wide)))
    else:
        searches = module.heads if module.separate_codebook_per_head else 1
        per_head = [_probe_targets(search_codebook(module, h % searches), num_samples, generator) for h in range(module.heads)]
        for kind in range(4):  # midpoints, graded, on-code, spread: every head probed at once
            rows = torch.cat([per_head[h][kind] for h in range(module.heads)], dim=1)
            inputs.append(_codebook_space_to_input(module, rows))
    return [module.spec.rows_to_input(t) for t in inputs]


def decode_probes(module: nn.Module) -> torch.Tensor:
    """Indices that ask a decode export for every code of every search (in the module's layout)."""
    if isinstance(module, GroupedResidualVQ):
        return torch.stack([decode_probes(rvq) for rvq in module.rvqs])
    k = module.codebook_size
    if isinstance(module, ResidualVQ):
        generator = torch.Generator().manual_seed(0)
        k = max(module.codebook_sizes)
        probes = torch.stack([torch.randperm(k, generator=generator) % size for size in module.codebook_sizes])[:, None]
        return residual_indices_from_seed(module.conventions, probes)
    codes = torch.arange(k)
    if module.heads > 1:
        codes = torch.stack([torch.roll(codes, h) for h in range(module.heads)], dim=-1)
    return codes.reshape(1, *module.layout.token_row_shape(k), *codes.shape[1:])
