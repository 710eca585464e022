"""Faults in a whole-model file, as edits of the ONNX graph (never of the eager model)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from vqdeploy.export.functions import nearest_code_nodes

Edit = Callable[[onnx.ModelProto], None]


def tampered(source: Path, edit: Edit, target: Path) -> Path:
    model = onnx.load(str(source))
    edit(model)
    onnx.save(model, str(target))
    return target


def edit_initializers(select: Callable[[str], bool], change: Callable[[np.ndarray], np.ndarray]) -> Edit:
    def edit(model: onnx.ModelProto) -> None:
        hits = 0
        for init in model.graph.initializer:
            if select(init.name):
                init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init).copy()), init.name))
                hits += 1
        if not hits:
            raise KeyError(f"no initializer selected among {[i.name for i in model.graph.initializer]}")

    return edit


def nudge_weight(name: str, amount: float = 1e-3) -> Edit:
    """The largest-magnitude element of one weight moved by ``amount`` times its magnitude."""

    def change(weight: np.ndarray) -> np.ndarray:
        flat = weight.reshape(-1)
        index = int(np.abs(flat).argmax())
        flat[index] += amount * abs(float(flat[index]))
        return weight

    return edit_initializers(lambda n: n == name, change)


def nudge_code(name: str, code: int, amount: float = 0.3) -> Edit:
    """Code ``code`` of a (1, K, d) codebook moved by ``amount`` times its norm along its first axis."""

    def change(embed: np.ndarray) -> np.ndarray:
        embed[0, code, 0] += amount * float(np.linalg.norm(embed[0, code]))
        return embed

    return edit_initializers(lambda n: n == name, change)


def round_to_float16(prefix: str) -> Edit:
    """Every float initializer under ``prefix`` rounded to float16 (stored as float32 again)."""
    return edit_initializers(
        lambda n: n.startswith(prefix),
        lambda w: w.astype(np.float16).astype(np.float32) if w.dtype == np.float32 else w,
    )


def drop_stage(stage: int) -> Edit:
    """Stage ``stage + 1`` searches the rows of stage ``stage``: the residual update of ``stage`` dropped."""

    def edit(model: onnx.ModelProto) -> None:
        nodes = nearest_code_nodes(model)
        nodes[stage + 1].input[0] = nodes[stage].input[0]

    return edit


def drop_stage_from_tokens(output: str, stage: int) -> Edit:
    """The tokens output loses one stage (its Concat of per-stage tokens loses an input)."""

    def edit(model: onnx.ModelProto) -> None:
        producers = {o: n for n in model.graph.node for o in n.output}
        node = producers[output]
        while node.op_type != "Concat":  # a Transpose or Reshape may follow the stack
            node = producers[node.input[0]]
        del node.input[stage]

    return edit
