"""The codecs under test, built once per session, and the inputs their tokens are checked on."""

import math

import torch
from codec_models import BUILDERS
from codec_parity import stage_codebooks

from vqdeploy.nn import FactorizedResidualVQ, ResidualVQ, SplitResidualVQ


class Codec:
    """One codec built once per test module: the model, its quantizer, latents and the conversion."""

    def __init__(self, name: str):
        import vqdeploy

        self.name = name
        self.model, self.quantizer, self.latents = BUILDERS[name]()
        self.converted = vqdeploy.convert(self.quantizer).eval()

    def inputs(self) -> dict[str, torch.Tensor]:
        """Codec latents, sine sweeps, noise and near-tie inputs, all in the quantizer's input space."""
        lat = self.latents
        scale = lat.std()
        b, d, t = 3, lat.shape[1], lat.shape[2]
        time = torch.arange(t, dtype=torch.float32)
        freqs = torch.linspace(0.5, t / 4, d)[:, None]  # one sweep per channel, low to high
        generator = torch.Generator().manual_seed(7)
        phase = 2 * math.pi * torch.rand(b, d, 1, generator=generator)  # no time step with every channel equal
        chirp = torch.sin(2 * math.pi * freqs * t * (time / t) ** 2 + phase)
        noise = torch.randn(b, d, t, generator=generator) * scale
        return {
            "latents": lat,
            "sine sweeps": (chirp * scale * 2).float(),
            "noise": noise,
            "near ties": near_tie_inputs(self.converted),
        }


def _stage0_projection(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(weight (d, D), bias (d,), stride) of the map from input space to stage 0's search space."""
    if isinstance(module, FactorizedResidualVQ):
        stage = module.quantizers[0]
        return stage.in_proj.weight.detach()[..., 0], stage.in_proj.bias.detach(), stage.stride
    rvq = module.semantic if isinstance(module, SplitResidualVQ) else module
    assert isinstance(rvq, ResidualVQ)
    if isinstance(rvq.project_in, torch.nn.Linear):
        return rvq.project_in.weight.detach(), rvq.project_in.bias.detach(), 1
    return torch.eye(rvq.dim), torch.zeros(rvq.dim), 1


@torch.no_grad()
def near_tie_inputs(module: torch.nn.Module, pairs: int = 48) -> torch.Tensor:
    """(1, D, T) inputs whose stage-0 rows lie on midpoints of each code and its nearest neighbour,
    and at graded distances (1e-7 .. 1e-4 of the pair's gap) on either side."""
    codebook = stage_codebooks(module)[0].double()
    k = codebook.shape[0]
    distances = torch.cdist(codebook, codebook)
    distances.fill_diagonal_(float("inf"))
    a = torch.arange(pairs) % k
    b = distances[a].argmin(dim=1)
    offsets = torch.tensor([0.0, 1e-7, -1e-7, 1e-5, -1e-5, 1e-4, -1e-4])
    ca, cb = codebook[a], codebook[b]
    rows = ((ca + cb) / 2)[:, None] + offsets[None, :, None].double() * (ca - cb)[:, None]
    rows = rows.reshape(-1, codebook.shape[1])
    weight, bias, stride = _stage0_projection(module)
    if isinstance(module, FactorizedResidualVQ):
        rows = rows * 3.0  # the search normalises: any positive scale of a midpoint direction is one
    x = torch.linalg.pinv(weight.double()) @ (rows - bias.double()).T  # (D, M)
    x = x.float()
    if stride > 1:
        x = x.repeat_interleave(stride, dim=1)
    step = math.lcm(*module.strides) if isinstance(module, FactorizedResidualVQ) else 1
    pad = (-x.shape[1]) % step
    if pad:
        x = torch.cat([x, x[:, :pad]], dim=1)
    return x.unsqueeze(0)


_CACHE: dict[str, Codec] = {}


def get_codec(name: str) -> Codec:
    """The codec `name`, built once per session."""
    if name not in _CACHE:
        _CACHE[name] = Codec(name)
    return _CACHE[name]
