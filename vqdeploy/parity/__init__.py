"""Token parity between the eager model and a backend: `verify` and what it is made of.

The package is `vqdeploy.parity`; `vqdeploy.verify` is its public function. Modules: `report`
(what is reported), `inputs` (default inputs and probes), `classify` (the verdict on each token
and vector), `compare` (`verify` itself), `whole_model` (a whole exported model: rows and tokens
of every search, `verify_model`), `model_report` (its report), `model_source` (loading a user's
model for the CLI), `polygraphy_adapter` (the same verdict inside Polygraphy's Comparator;
imports polygraphy).

What is proven, for every input verify runs:

- **Tokens.** Each search (a residual stage, or a head) is checked on the rows that the *eager*
  model's codebooks give for the backend's earlier tokens (`ResidualVQ.search_rows`), so a stage
  is judged on its own input even after an earlier stage took another code of a tie. Every served
  token is classified with the project's one tie rule, `vqdeploy.ops.certify`, against the eager
  model's codebook: *identical* (the eager model's token on those rows), *certified tie* (another
  code within the float32 rounding bound tau of the float64 nearest), or *violation*.
- **Vectors.** Every served vector (``quantize`` and ``decode`` exports) is compared with the eager
  model's decode of the served tokens: bit for bit where no projection follows the codebook, within
  1e-6 relative (to max(1, |row|)) where one does. Any other difference is a violation.
- **Layout.** Indices of another shape than the eager model's (a dropped stage, a missing head)
  are a violation of every token the backend failed to serve, never a crash.

The inputs decide which codes are exercised, so by default verify builds, for every search, probes
that put that search's rows exactly on every code, exactly between each code and its nearest
neighbour, and at graded distances from those midpoints (`default_inputs`); ``decode`` exports are
also asked for every code of every stage. A tampered code, a swapped pair, a dropped or duplicated
stage, a rounded codebook or MatMul, or a changed projection then serves other tokens or vectors
somewhere, and the report fails. The table's "codes" column says how many codes each search's
eager tokens reached.
"""

from vqdeploy.parity.classify import check_tokens, check_vectors, classify_tokens, new_stage_reports
from vqdeploy.parity.compare import verify
from vqdeploy.parity.inputs import decode_probes, default_inputs
from vqdeploy.parity.model_report import ModelParityReport, SearchParity
from vqdeploy.parity.report import (
    CRITERION_CERTIFIED,
    CRITERION_IDENTICAL,
    ParityReport,
    StageReport,
    VectorReport,
)
from vqdeploy.parity.whole_model import verify_model

__all__ = [
    "CRITERION_CERTIFIED",
    "CRITERION_IDENTICAL",
    "ModelParityReport",
    "ParityReport",
    "SearchParity",
    "StageReport",
    "VectorReport",
    "check_tokens",
    "check_vectors",
    "classify_tokens",
    "decode_probes",
    "default_inputs",
    "new_stage_reports",
    "verify",
    "verify_model",
]
