"""The example models: shipped weights, real-data quality, checkpoints, export-clean eval path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqdeploy.errors import CheckpointError
from vqdeploy.examples import (
    DigitsRVQTokenizer,
    DigitsVQVAE,
    fit,
    load_digits_tensor,
    load_example,
    load_pretrained,
    save_example,
    split_digits,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_digits_tensor()


def test_digits_are_8x8_images_in_unit_range(images: torch.Tensor) -> None:
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    _, labels = load_digits_tensor(with_labels=True)
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))


def test_shipped_model_reconstructs_held_out_digits(images: torch.Tensor) -> None:
    model = load_pretrained()
    assert isinstance(model, DigitsVQVAE) and not model.training
    _, test = split_digits(images)
    with torch.inference_mode():
        reconstruction, indices = model(test)
    assert reconstruction.shape == test.shape and indices.shape == (test.shape[0], 4, 4)
    assert float(torch.mean((reconstruction - test) ** 2)) < 0.01  # a blank-image guess scores ~0.11
    assert indices.unique().numel() > 32  # most of the 64 codes are in use
    with torch.inference_mode():
        assert torch.equal(model.encode(test), indices)
        assert torch.allclose(model.decode(indices), reconstruction)


def test_shipped_checkpoint_is_small() -> None:
    from vqdeploy.examples import pretrained_path

    assert pretrained_path().is_file()
    assert (REPO / "vqdeploy" / "data" / "digits_vqvae.safetensors").stat().st_size < 2 * 2**20


@pytest.mark.parametrize("cls", [DigitsVQVAE, DigitsRVQTokenizer])
def test_eval_path_is_torch_export_clean(cls: type, images: torch.Tensor) -> None:
    model = cls(codebook_size=16, hidden=8)
    fit(model, images[:64], steps=1, batch_size=32, progress=False)  # k-means initialises the codebooks
    model.eval()
    program = torch.export.export(model, (images[:4],), strict=False)
    with torch.inference_mode():
        want = model(images[:4])
        got = program.module()(images[:4])
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0])


@pytest.mark.parametrize("cls, names", [(DigitsVQVAE, ["codebook"]), (DigitsRVQTokenizer, ["stage 0", "stage 1"])])
def test_fit_records_codebook_health(cls: type, names: list[str], images: torch.Tensor) -> None:
    model = cls(codebook_size=8, hidden=8, **({"num_quantizers": 2} if cls is DigitsRVQTokenizer else {}))
    health: list = []
    fit(model, images[:64], steps=4, batch_size=32, progress=False, health=health, health_every=2)
    assert [step for step, _ in health] == [0, 2, 3]
    for _, values in health:
        assert list(values) == names
        assert all(1.0 <= perplexity <= 8.0 + 1e-6 and 0 <= dead <= 8 for perplexity, dead in values.values())


def test_example_checkpoint_round_trip_and_refusals(tmp_path: Path, images: torch.Tensor) -> None:
    model = DigitsRVQTokenizer(num_quantizers=2, codebook_size=8, hidden=8)
    fit(model, images[:64], steps=2, batch_size=32, progress=False)
    model.eval()
    path = save_example(model, tmp_path / "rvq.safetensors")
    with pytest.raises(FileExistsError):
        save_example(model, path)
    loaded = load_example(path)
    assert isinstance(loaded, DigitsRVQTokenizer) and loaded.config == model.config
    with torch.inference_mode():
        assert torch.equal(loaded(images[:8])[1], model(images[:8])[1])
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError):
        load_example(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError):
        load_example(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError):
        load_pretrained("no_such_model")


def test_training_script_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "models" / "train_digits_vqvae.py"), "--steps", "3", "--no-plots", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "digits_vqvae.safetensors").is_file()
    assert isinstance(load_example(tmp_path / "digits_vqvae.safetensors"), DigitsVQVAE)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_training_script_runs_under_torchrun(tmp_path: Path) -> None:
    """The README's torchrun command: 2 gloo ranks, DDP, the codebook equal on both at the end."""
    script = REPO / "models" / "train_digits_vqvae_ddp.py"
    for _attempt in range(2):  # the free port can be taken by another process before torchrun binds it
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
        proc = subprocess.run(
            [*torchrun, str(script), "--steps", "3", "--out", str(tmp_path / "ddp.safetensors")],
            capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
        )
        if "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 ranks, 3 steps" in proc.stdout and "codebooks bitwise equal on every rank: True" in proc.stdout
    assert isinstance(load_example(tmp_path / "ddp.safetensors"), DigitsVQVAE)
    alone = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    assert alone.returncode == 2 and "torchrun" in alone.stderr
