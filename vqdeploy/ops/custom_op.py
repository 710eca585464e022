"""The op `vqdeploy::nearest_code` (a torch custom op) and its dispatch: the compiled CPU kernel
(`cpu_kernels`), the Triton kernel on CUDA (`triton_kernels`), else the blocked search of the
contract with its exact re-check. `nearest_code` is the public function."""

from __future__ import annotations

import torch

from vqdeploy.ops import cpu_kernels
from vqdeploy.ops.contract import nearest_code_exact


def _triton_available() -> bool:
    try:
        from vqdeploy.ops import triton_kernels  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return True


@torch.library.custom_op("vqdeploy::nearest_code", mutates_args=())
def _nearest_code_op(x: torch.Tensor, codebook: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    if x.device.type == "cpu" and codebook.shape[0] > 0 and cpu_kernels.available():
        return cpu_kernels.nearest_code_cpu(x, codebook)
    return nearest_code_exact(x, codebook)


@_nearest_code_op.register_kernel("cuda")
def _nearest_code_cuda(x: torch.Tensor, codebook: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    if _triton_available():
        from vqdeploy.ops.triton_kernels import nearest_code_triton

        return nearest_code_triton(x, codebook, mode=mode)
    return nearest_code_exact(x, codebook)


@_nearest_code_op.register_fake
def _nearest_code_fake(x: torch.Tensor, codebook: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    return x.new_empty((x.shape[0],), dtype=torch.int64)


MODES = ("exact", "fast")


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    """Index of the nearest code for every row of ``x`` (the contract: `vqdeploy.ops.contract`).

    >>> import torch
    >>> codes = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    >>> nearest_code(torch.tensor([[0.9, 0.8], [0.5, 0.5]]), codes).tolist()  # the tie goes to 0
    [1, 0]
    """
    return torch.ops.vqdeploy.nearest_code(x, codebook, mode)
