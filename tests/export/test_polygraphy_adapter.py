"""Polygraphy (the real CLI and its Python API) on vqdeploy exports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from export_cases import make_input

polygraphy = pytest.importorskip("polygraphy")


def _polygraphy_command() -> list[str]:
    script = Path(sys.executable).with_name("polygraphy")
    if script.exists():
        return [str(script)]
    found = shutil.which("polygraphy")
    return [found] if found else [sys.executable, "-m", "polygraphy"]


@pytest.mark.parametrize(
    "name, shapes",
    [("heads_separate", "x:[2,5,64]"), ("image", "x:[3,64,4,6]")],
    ids=["sequence", "image"],
)
def test_polygraphy_run_cli_succeeds(exports, name, shapes):
    path = exports(name, "quantize").path
    result = subprocess.run(
        [*_polygraphy_command(), "run", str(path), "--onnxrt", "--input-shapes", shapes, "--providers", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=path.parent,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "PASSED" in log, log


# polygraphy's relative-error statistics divide 0 by 0 where both outputs are 0; harmless here
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("name", ["heads_separate", "residual_projection"])
def test_polygraphy_fused_and_unfused_agree_exactly(exports, digits, name):
    from polygraphy import comparator
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    fused, unfused = exports(name, "quantize"), exports(name, "quantize", fused=False)
    runners = [
        OnnxrtRunner(SessionFromOnnx(fused.path.read_bytes(), providers=["cpu"]), name="fused"),
        OnnxrtRunner(SessionFromOnnx(unfused.path.read_bytes(), providers=["cpu"]), name="unfused"),
    ]
    feeds = [
        {"x": make_input(fused.config, data, sizes, digits).numpy()}
        for data in ("digits", "random")
        for sizes in ((1, 1), (7, 7), (1, 1797))
    ]
    results = Comparator.run(runners, data_loader=feeds)
    assert len(results) == 2 and all(len(iterations) == len(feeds) for _, iterations in results)

    simple = getattr(comparator, "SimpleCompareFunc", None) or comparator.CompareFunc.simple  # older polygraphy
    accuracy = Comparator.compare_accuracy(results, compare_func=simple(atol=0.0, rtol=0.0))
    assert bool(accuracy)

    # exact equality, checked by hand as well, and the indices are those of the eager module
    for feed, fused_out, unfused_out in zip(feeds, results[0][1], results[1][1], strict=True):
        for key in ("vectors", "indices"):
            np.testing.assert_array_equal(np.asarray(fused_out[key]), np.asarray(unfused_out[key]))
        with torch.no_grad():
            _, indices, _ = fused.module(torch.from_numpy(feed["x"]))
        np.testing.assert_array_equal(np.asarray(fused_out["indices"]), indices.numpy())
