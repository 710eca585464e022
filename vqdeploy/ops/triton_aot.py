"""Ahead-of-time PTX of the single-pass exact kernel, for TensorRT's AOT plugin
(`vqdeploy.runtime.trt_plugin`): compiled from the same `_nearest_code_kernel` the JIT path runs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import triton

from vqdeploy.errors import InputDtypeError, UnsupportedOptionError
from vqdeploy.ops.triton_kernels import FP_FUSION, KernelConfig, _nearest_code_kernel

AOT_CONFIG = KernelConfig(block_m=64, block_k=64, block_d=32, num_warps=4, num_stages=1)
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class AotKernel:
    """A compiled single-pass kernel: launch with grid (ceil(M / block_m),), block (block_x,).

    Kernel parameters, in order: x_ptr, codebook_ptr, M (i32), K (i32), D (i32), out_ptr (int64).
    """

    name: str
    ptx: str
    block_m: int
    block_x: int
    shared_mem: int
    num_params: int

    def grid_x(self, num_rows: int) -> int:
        """Programs to launch for ``num_rows`` rows."""
        return -(-num_rows // self.block_m)


def _strip_unused_trailing_params(ptx: str, name: str) -> tuple[str, int]:
    """Drop trailing kernel parameters the body never reads; returns (ptx, parameters kept).

    Recent Triton appends scratch-pointer parameters (global/profile scratch) that a caller
    outside Triton, such as TensorRT's AOT launcher, does not pass; unused ones are safe to drop.
    """
    match = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\(([^)]*)\)", ptx)
    if match is None:
        raise ValueError(f"kernel {name} not found in the PTX")
    params = [p.strip() for p in match.group(1).split(",") if p.strip()]
    names = [p.split()[-1] for p in params]
    body = ptx[match.end() :]
    keep = len(params)
    while keep > 0 and not re.search(r"\b" + re.escape(names[keep - 1]) + r"\b", body):
        keep -= 1
    new_list = ",\n\t".join(params[:keep])
    start, end = match.span(1)
    return ptx[:start] + "\n\t" + new_list + "\n" + ptx[end:], keep


def compile_exact_ptx(
    x_dtype: torch.dtype = torch.float32,
    codebook_dtype: torch.dtype | None = None,
    target: Any = None,
    config: KernelConfig = AOT_CONFIG,
) -> AotKernel:
    """PTX of the single-pass ``ieee`` kernel (exact, ties certified) with code norms in-kernel.

    ``target`` is a ``triton.backends.compiler.GPUTarget`` (default: the current GPU); passing
    one, e.g. ``GPUTarget("cuda", 90, 32)``, compiles without a GPU.
    """
    codebook_dtype = codebook_dtype or x_dtype
    for dtype in (x_dtype, codebook_dtype):
        if dtype not in _TRITON_DTYPES:
            raise InputDtypeError(f"AOT kernel inputs must be float32, float16 or bfloat16, got {dtype}")
    signature = {
        "x_ptr": "*" + _TRITON_DTYPES[x_dtype],
        "c_ptr": "*" + _TRITON_DTYPES[codebook_dtype],
        "cnorm_ptr": "constexpr",
        "rows_ptr": "constexpr",
        "bound_ptr": "constexpr",
        "M": "i32",
        "K": "i32",
        "D": "i32",
        "list_norm_max": "constexpr",
        "out_ptr": "*i64",
        "cand_ptr": "constexpr",
        "BLOCK_M": "constexpr",
        "BLOCK_K": "constexpr",
        "BLOCK_D": "constexpr",
        "DOT": "constexpr",
        "ROUND": "constexpr",
        "TRACK_SECOND": "constexpr",
        "NORMS_IN_KERNEL": "constexpr",
        "ROWS_INDEXED": "constexpr",
        "LIST": "constexpr",
        "LIST_WIDTH": "constexpr",
        "BF16_OPERANDS": "constexpr",
    }
    constexprs = {
        "cnorm_ptr": None,
        "rows_ptr": None,
        "bound_ptr": None,
        "list_norm_max": 0.0,
        "cand_ptr": None,
        "BLOCK_M": config.block_m,
        "BLOCK_K": config.block_k,
        "BLOCK_D": config.block_d,
        "DOT": "ieee",
        "ROUND": "",
        "TRACK_SECOND": False,
        "NORMS_IN_KERNEL": True,
        "ROWS_INDEXED": False,
        "LIST": 0,
        "LIST_WIDTH": 2,
        "BF16_OPERANDS": False,
    }
    kernel = _nearest_code_kernel
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise UnsupportedOptionError("compile_exact_ptx needs the compiled kernel; unset TRITON_INTERPRET")
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": FP_FUSION}
    compiled = triton.compile(source, target=target, options=options)
    name = compiled.metadata.name
    ptx, kept = _strip_unused_trailing_params(compiled.asm["ptx"], name)
    return AotKernel(
        name=name,
        ptx=ptx,
        block_m=config.block_m,
        block_x=compiled.metadata.num_warps * 32,
        shared_mem=int(compiled.metadata.shared),
        num_params=kept,
    )
