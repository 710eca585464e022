"""Token checks between a converted quantizer and another source of tokens (the codec, or ORT).

Each stage is judged on the rows it searches when the earlier stages served the *given* tokens
(``search_rows(x, tokens)``), so a tie taken differently at one stage does not make later stages
look wrong; every given token must be the converted module's own exact token on those rows, or a
certified tie with it (`vqdeploy.ops.nearest_code.certify`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqdeploy.nn import FactorizedResidualVQ, ResidualVQ, SplitResidualVQ
from vqdeploy.ops.contract import certify, nearest_code_reference


@dataclass
class Tally:
    tokens: int = 0
    identical: int = 0
    certified_ties: int = 0
    violations: int = 0

    @property
    def ok(self) -> bool:
        return self.tokens > 0 and self.violations == 0


def stage_tokens(module: torch.nn.Module, tokens) -> list[torch.Tensor]:
    """Tokens in the module's layout -> one flat tensor per stage (row order of search_rows)."""
    if isinstance(module, FactorizedResidualVQ):
        return [t.reshape(-1) for t in module.stage_indices(tokens)]
    return [t.reshape(-1) for t in torch.as_tensor(tokens)]


def stage_codebooks(module: torch.nn.Module) -> list[torch.Tensor]:
    if isinstance(module, FactorizedResidualVQ):
        return [stage.search_codebook().detach() for stage in module.quantizers]
    layers = module.layers
    return [layer.codebook.detach() for layer in layers]


def search_rows(module: torch.nn.Module, x: torch.Tensor, tokens) -> list[torch.Tensor]:
    if isinstance(module, ResidualVQ):
        return list(module.search_rows(x, torch.as_tensor(tokens)))
    if isinstance(module, SplitResidualVQ):
        return module.search_rows(x, torch.as_tensor(tokens))
    return module.search_rows(x, tokens)


def tally(module: torch.nn.Module, x: torch.Tensor, tokens) -> Tally:
    """Identical / certified-tie / violation counts of `tokens` (module layout) for input x."""
    result = Tally()
    with torch.no_grad():
        given_stages = stage_tokens(module, tokens)
        if isinstance(module, ResidualVQ | SplitResidualVQ) and len(given_stages) < module.num_quantizers:
            # fewer stages served (n_q): the later stages' rows need some tokens; they are not counted
            own = module.eval_tokens(x) if isinstance(module, ResidualVQ) else module.encode(x)
            tokens = torch.cat([torch.as_tensor(tokens), own[len(given_stages) :]])
        rows = search_rows(module, x, tokens)
        for stage_rows, codebook, given in zip(rows, stage_codebooks(module), given_stages, strict=False):
            exact = nearest_code_reference(stage_rows, codebook)
            certificate = certify(stage_rows, codebook, given)
            same = given == exact
            result.tokens += given.numel()
            result.identical += int(same.sum())
            result.certified_ties += int((~same & certificate.certified).sum())
            result.violations += int((~certificate.certified).sum())
    return result
