"""The one check of a device string: what exists, and what a backend needs."""

from __future__ import annotations

import torch

from vqdeploy.errors import DeviceNotAvailableError


def check_device(device: str, cuda_only: str | None = None) -> torch.device:
    """`device` parsed, once it is known to exist here; `DeviceNotAvailableError` otherwise.

    cuda_only: who needs a CUDA device (e.g. "TensorRT engines"); a CPU device is refused then.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise DeviceNotAvailableError(f"unknown device {device!r}; use 'cpu' or 'cuda[:N]'") from error
    if parsed.type not in ("cpu", "cuda"):
        raise DeviceNotAvailableError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if cuda_only is not None and parsed.type != "cuda":
        raise DeviceNotAvailableError(f"{cuda_only} run on a CUDA device; got device={device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceNotAvailableError(f"device={device!r} was asked for, but no CUDA device is available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceNotAvailableError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) exist")
    return parsed
