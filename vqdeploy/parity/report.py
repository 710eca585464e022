"""What verify reports: per search, per vector, and the verdict (`ParityReport.passed`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from vqdeploy.errors import ParityError

CRITERION_CERTIFIED = "certified ties"  # differing tokens pass when within the float32 bound
CRITERION_IDENTICAL = "identical"  # vqdeploy's own exact search: every token must be the eager one


@dataclass
class StageReport:
    stage: str
    tokens: int = 0
    identical: int = 0
    certified_ties: int = 0
    violations: int = 0
    worst_gap: float = 0.0  # largest float64 distance gap among differing tokens
    worst_gap_over_tau: float = 0.0  # the same gap divided by its tau (> 1 means violation)
    codes_exercised: int = 0  # distinct codes among the eager tokens of this search
    codebook_size: int = 0
    _seen: set[int] = field(default_factory=set, repr=False)


@dataclass
class VectorReport:
    rows: int = 0  # vectors compared
    violations: int = 0  # vectors that differ from the eager decode of the served tokens
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0  # relative to max(1, |row|)
    tolerance: float = 0.0  # relative; 0 where codes are gathered as stored, with no projection after them


@dataclass
class ParityReport:
    backend: str
    device: str
    precision: str
    part: str
    input_shapes: list[list[int]]
    criterion: str = CRITERION_CERTIFIED
    stages: list[StageReport] = field(default_factory=list)
    vectors: VectorReport = field(default_factory=VectorReport)
    problems: list[str] = field(default_factory=list)  # layout violations, named

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    @property
    def identical(self) -> int:
        return sum(s.identical for s in self.stages)

    @property
    def certified_ties(self) -> int:
        return sum(s.certified_ties for s in self.stages)

    @property
    def violations(self) -> int:
        return sum(s.violations for s in self.stages)

    # Kept for callers of the earlier report (vectors now have a section of their own).
    @property
    def max_abs_vector_diff(self) -> float:
        return self.vectors.max_abs_diff

    @property
    def max_vector_rel_diff(self) -> float:
        return self.vectors.max_rel_diff

    @property
    def vector_tolerance(self) -> float:
        return self.vectors.tolerance

    @property
    def vectors_ok(self) -> bool:
        return self.vectors.violations == 0

    @property
    def passed(self) -> bool:
        return self.violations == 0 and self.vectors_ok and not self.problems

    def failure_summary(self) -> str:
        """What failed, in one line ("" when the report passed)."""
        failed = []
        if self.violations:
            failed.append(f"{self.violations} token(s) differ beyond float32 rounding")
        if not self.vectors_ok:
            failed.append(f"vectors differ by {self.max_vector_rel_diff:.3g} relative")
        failed.extend(self.problems)
        return "; ".join(failed)

    def raise_if_failed(self) -> ParityReport:
        """`ParityError` naming what failed unless the report passed; returns the report (for chaining)."""
        if not self.passed:
            raise ParityError(f"parity check failed ({self.backend}, part {self.part}): {self.failure_summary()}")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for stage in data["stages"]:
            stage.pop("_seen", None)
        data.update(
            passed=self.passed, tokens=self.tokens, identical=self.identical,
            certified_ties=self.certified_ties, violations=self.violations,
            max_abs_vector_diff=self.max_abs_vector_diff, max_vector_rel_diff=self.max_vector_rel_diff,
            vector_tolerance=self.vector_tolerance,
        )
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        rows = [("stage", "tokens", "identical", "certified ties", "violations", "worst gap / tau", "codes")]
        rows += [
            (s.stage, str(s.tokens), str(s.identical), str(s.certified_ties), str(s.violations),
             f"{s.worst_gap_over_tau:.3g}", f"{s.codes_exercised}/{s.codebook_size}")
            for s in self.stages
        ]
        v = self.vectors
        if v.rows:
            rows.append(("vectors", str(v.rows), str(v.rows - v.violations), "-", str(v.violations),
                         f"max diff {v.max_abs_diff:.3g}", "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"violation: {problem}" for problem in self.problems]
        for s in self.stages:
            if s.violations:
                lines.append(
                    f"violation: {s.stage}: {s.violations} tokens are not the eager model's nor a certified tie "
                    f"(worst gap {s.worst_gap:.3g} = {s.worst_gap_over_tau:.3g} tau)"
                )
        if v.violations:
            lines.append(
                f"violation: vectors: {v.violations} of {v.rows} differ from the eager decode of the served tokens "
                f"(max |diff| {v.max_abs_diff:.3g}, relative {v.max_rel_diff:.3g}, tolerance {v.tolerance:g})"
            )
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"{verdict}: backend={self.backend} device={self.device} precision={self.precision} part={self.part}; "
            f"criterion: {self.criterion}; {self.tokens} tokens, {self.identical} identical, "
            f"{self.certified_ties} certified ties, {self.violations} violations; "
            f"{v.rows} vectors, {v.violations} differ; {len(self.input_shapes)} inputs"
        )
        return "\n".join(lines)
