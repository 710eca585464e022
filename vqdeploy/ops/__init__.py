"""The fused nearest-code op and its implementations."""

from vqdeploy.ops.nearest_code import (
    Certificate,
    certify,
    nearest_code,
    nearest_code_blocked,
    nearest_code_reference,
    squared_distances64,
    tie_tolerance,
)

__all__ = [
    "Certificate",
    "certify",
    "nearest_code",
    "nearest_code_blocked",
    "nearest_code_reference",
    "squared_distances64",
    "tie_tolerance",
]
