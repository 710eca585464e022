"""Races: two writers of one path, and a Quantizer closed while another thread uses it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from vqdeploy import read_metadata, runtime
from vqdeploy.errors import QuantizerClosedError

RACING_EXPORT = textwrap.dedent(
    """
    import sys, torch
    from vqdeploy import VectorQuantize, export_onnx
    from vqdeploy.errors import OutputExistsError
    vq = VectorQuantize(dim=8, codebook_size=int(sys.argv[2])).eval()
    print("ready", flush=True)
    sys.stdin.readline()  # both processes pass the existence check together, once both are ready
    try:
        export_onnx(vq, sys.argv[1], part="encode")
        print("won")
    except OutputExistsError as error:
        print("refused", error)
    """
)


@pytest.mark.slow
def test_two_processes_exporting_to_one_path_one_wins(tmp_path):
    for round_ in range(2):
        target = tmp_path / f"race{round_}.onnx"
        children = [subprocess.Popen([sys.executable, "-c", RACING_EXPORT, str(target), str(codes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for codes in (16, 32)]
        for child in children:  # both have imported torch and built their module
            assert child.stdout.readline().strip() == "ready", child.communicate(timeout=60)
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=180) for child in children]
        verdicts = [out.strip().split(" ")[0] for out, _ in outputs]
        assert sorted(verdicts) == ["refused", "won"], outputs
        winner = (16, 32)[verdicts.index("won")]
        assert read_metadata(target).codebook_size == winner  # the winner's export is the one kept
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f"race{round_}")) == [target.name]


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_encode_after_close_is_typed(hardening_exports, backend):
    _, path, _ = hardening_exports["last"]
    quantizer = runtime.load(path, backend=backend)
    quantizer.close()
    with pytest.raises(QuantizerClosedError):
        quantizer.encode(np.zeros((1, 3, 8), np.float32))
    quantizer.close()  # closing twice is fine


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_encode_during_close_from_another_thread_is_typed(hardening_exports, backend):
    _, path, _ = hardening_exports["last"]
    x = np.random.default_rng(0).standard_normal((1, 20_000, 8)).astype(np.float32)
    for _ in range(3):
        quantizer = runtime.load(path, backend=backend, chunk_size=256)
        expected = quantizer.encode(x)
        errors: list[BaseException] = []
        results: list[np.ndarray] = []
        started = threading.Event()

        def work(quantizer=quantizer, errors=errors, results=results, started=started):
            try:
                while True:
                    started.set()
                    results.append(quantizer.encode(x))
            except BaseException as error:  # noqa: BLE001 - the test inspects what came
                errors.append(error)

        thread = threading.Thread(target=work)
        thread.start()
        started.wait()
        quantizer.close()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], QuantizerClosedError), errors
        assert all(np.array_equal(r, expected) for r in results)  # what finished is complete and right
