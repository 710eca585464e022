"""What the CLI prints: plain-text tables, short rates and ratios, one-line errors, progress bars."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from typing import Any


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain-text table; columns listed in `right` are right-aligned (numbers)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    lines = [line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])]
    return "\n".join(text.rstrip() for text in lines)


def rate(value: float | None) -> str:
    """Vectors per second, short: 1.23M, 456k, 789."""
    if value is None or not math.isfinite(value):
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def ratio(value: float | None) -> str:
    """A speed ratio, "1.23x" ("-" when unknown)."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


# Terminal colour / cursor escapes (ONNX Runtime colours its log lines), and the prefix of an ONNX
# Runtime log line: "2026-12-01 18:00:00.123456789 [E:onnxruntime:, inference_session.cc:2544 operator()] ".
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_ORT_LOG_PREFIX = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \[[VIWEF]:onnxruntime:[^\]]*\] ")


def one_line(error: BaseException) -> str:
    """An error's message on one line (ONNX Runtime's and torch's messages span several), without
    terminal escapes or ONNX Runtime's log-line prefixes."""
    text = _ORT_LOG_PREFIX.sub("", _ANSI.sub("", str(error)))
    return " ".join(text.split()) or type(error).__name__


def progress(iterable=None, *, total: int | None = None, desc: str = "", quiet: bool = False, unit: str = "it"):
    """A tqdm bar on stderr, shown on a terminal only (disable=None) and never with --quiet."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True if quiet else None, leave=False,
                file=sys.stderr)
