"""What whole-model verify reports: per search, the rows check, the tokens check and the
end-to-end count of served tokens that differ from the eager model's, with their cause."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from vqdeploy.parity.report import StageReport


@dataclass
class SearchParity:
    """One search (a residual stage, a head, a codebook) of one quantizer inside the model."""

    search: str  # the metadata's id, e.g. "quantizer.stage3"
    quantizer: str
    label: str
    codebook_size: int
    dim: int
    # (1) rows: the backend's rows against the eager model's for the same input
    rows: int = 0
    rows_over_tolerance: int = 0
    max_drift: float = 0.0  # max |backend row - eager row| over elements
    tolerance: float = 0.0  # the largest tolerance applied (one per input)
    worst_drift_over_tolerance: float = 0.0
    eager_error: float = 0.0  # max |eager float32 row - float64 row|: the upstream layers' float32 error
    # (2) tokens: every served token against the eager codebook on the backend's own rows
    tokens: StageReport = field(default_factory=lambda: StageReport("tokens"))
    # end to end: served tokens that differ from the eager model's own tokens, and why
    differ_from_eager: int = 0
    tie_crossings: int = 0  # rows within tolerance, token identical or a certified tie on them
    after_earlier_stage: int = 0  # an earlier stage of the same token took another code (a tie crossing)
    differ_violations: int = 0  # rows beyond tolerance, or the token is a violation on the backend's rows

    @property
    def violations(self) -> int:
        return self.rows_over_tolerance + self.tokens.violations


@dataclass
class ModelParityReport:
    backend: str
    device: str
    precision: str
    input_shapes: list[list[list[int]]]
    safety: float  # tolerance = safety * max(eager_error, u * max |row|), per search and input
    searches: list[SearchParity] = field(default_factory=list)
    outputs_checked: list[str] = field(default_factory=list)  # tokens outputs compared with the searches' tokens
    problems: list[str] = field(default_factory=list)
    kind: str = "model"
    part: str = "model"

    @property
    def tokens(self) -> int:
        return sum(s.tokens.tokens for s in self.searches)

    @property
    def identical(self) -> int:
        return sum(s.tokens.identical for s in self.searches)

    @property
    def certified_ties(self) -> int:
        return sum(s.tokens.certified_ties for s in self.searches)

    @property
    def rows_over_tolerance(self) -> int:
        return sum(s.rows_over_tolerance for s in self.searches)

    @property
    def token_violations(self) -> int:
        return sum(s.tokens.violations for s in self.searches)

    @property
    def violations(self) -> int:
        """Rows beyond tolerance plus tokens that are neither the eager token nor a certified tie."""
        return sum(s.violations for s in self.searches)

    @property
    def differ_from_eager(self) -> int:
        return sum(s.differ_from_eager for s in self.searches)

    @property
    def tie_crossings(self) -> int:
        return sum(s.tie_crossings for s in self.searches)

    @property
    def vectors_ok(self) -> bool:  # the bare-quantizer report's field, for callers of either
        return True

    @property
    def passed(self) -> bool:
        return self.violations == 0 and not self.problems and bool(self.searches)

    def failure_summary(self) -> str:
        """What failed, in one line ("" when the report passed)."""
        if self.passed:
            return ""
        others = f", {len(self.problems)} other problem(s)" if self.problems else ""
        return (f"{self.rows_over_tolerance} row(s) beyond tolerance, {self.token_violations} token "
                f"violation(s){others}")

    def raise_if_failed(self):
        """`ParityError` naming what failed unless the report passed; returns the report."""
        if not self.passed:
            from vqdeploy.errors import ParityError

            raise ParityError(f"whole-model parity check failed: {self.failure_summary()}")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for search, entry in zip(self.searches, data["searches"], strict=True):
            entry["tokens"].pop("_seen", None)
            entry["violations"] = search.violations
        data.update(passed=self.passed, tokens=self.tokens, identical=self.identical,
                    certified_ties=self.certified_ties, violations=self.violations,
                    rows_over_tolerance=self.rows_over_tolerance, differ_from_eager=self.differ_from_eager,
                    tie_crossings=self.tie_crossings)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        header = ("search", "rows", "max drift", "tolerance", "drift/tol", "over tol", "tokens", "identical",
                  "certified ties", "violations", "codes", "differ from eager", "tie crossings", "after earlier", "diff. violations")
        rows = [header]
        for s in self.searches:
            t = s.tokens
            rows.append((s.search, str(s.rows), f"{s.max_drift:.3g}", f"{s.tolerance:.3g}",
                         f"{s.worst_drift_over_tolerance:.3g}", str(s.rows_over_tolerance), str(t.tokens),
                         str(t.identical), str(t.certified_ties), str(t.violations),
                         f"{t.codes_exercised}/{t.codebook_size}", str(s.differ_from_eager), str(s.tie_crossings),
                         str(s.after_earlier_stage), str(s.differ_violations)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"rows: backend rows vs the eager model's rows for the same input (after the backend's own earlier "
            f"stages); tolerance = {self.safety:g} x max(|eager float32 rows - float64 rows|, 2^-24 max|row|), the "
            "float32 error of the layers upstream measured on each input"
        )
        lines.append("tokens: every served token vs the eager codebook's exact nearest code on the backend's rows "
                     "(identical / certified tie under vqdeploy.ops.certify / violation)")
        lines += [f"violation: {p}" for p in self.problems]
        for s in self.searches:
            if s.rows_over_tolerance:
                lines.append(f"violation: {s.search}: the model computes other rows: {s.rows_over_tolerance} of {s.rows} "
                             f"rows drift up to {s.max_drift:.3g} (tolerance {s.tolerance:.3g}, eager float32 error "
                             f"{s.eager_error:.3g})")
            if s.tokens.violations:
                lines.append(f"violation: {s.search}: {s.tokens.violations} tokens are not the nearest code of the "
                             f"eager codebook on the backend's rows nor a certified tie (worst gap "
                             f"{s.tokens.worst_gap_over_tau:.3g} tau)")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"{verdict}: backend={self.backend} device={self.device} precision={self.precision} (whole model); "
            f"{len(self.searches)} searches, {self.tokens} tokens, {self.identical} identical, {self.certified_ties} "
            f"certified ties, {self.token_violations} token violations, {self.rows_over_tolerance} rows beyond "
            f"tolerance; end to end {self.differ_from_eager} served tokens differ from eager ({self.tie_crossings} tie "
            f"crossings); {len(self.input_shapes)} inputs"
        )
        return "\n".join(lines)


__all__ = ["ModelParityReport", "SearchParity"]
