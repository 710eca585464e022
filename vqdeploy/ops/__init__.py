"""The nearest-code op: its contract (`contract`), the custom op and its dispatch (`custom_op`),
and the kernels (`cpu_kernels`, `triton_kernels`, `triton_aot`); `pass_emulation` replays the GPU
kernel's passes on the CPU."""

from vqdeploy.ops.contract import (
    Certificate,
    certify,
    nearest_code_blocked,
    nearest_code_reference,
    squared_distances64,
    tie_tolerance,
)
from vqdeploy.ops.custom_op import nearest_code

__all__ = [
    "Certificate",
    "certify",
    "nearest_code",
    "nearest_code_blocked",
    "nearest_code_reference",
    "squared_distances64",
    "tie_tolerance",
]
