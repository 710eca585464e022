"""Train the DigitsVQVAE example on scikit-learn's digits; write plots and the checkpoint.

    python models/train_digits_vqvae.py                       # -> models/out/
    python models/train_digits_vqvae.py --ship --force        # also replace vqdeploy/data/digits_vqvae.safetensors

About 40 s on 2 CPU cores. Needs scikit-learn, and matplotlib for the plots (pip install -e ".[models]").
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from vqdeploy.examples import DigitsVQVAE, fit, load_digits_tensor, save_example, split_digits

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parent / "vqdeploy" / "data" / "digits_vqvae.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training batches (default 1000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these convolutions are tiny, extra threads only spin)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="folder for plots and the checkpoint")
    parser.add_argument("--ship", action="store_true", help=f"also write the checkpoint to {SHIPPED}")
    parser.add_argument("--force", action="store_true", help="replace existing checkpoints")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = split_digits(load_digits_tensor())

    model = DigitsVQVAE()
    start = time.perf_counter()
    health: list = []
    fit(model, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, health=health)
    seconds = time.perf_counter() - start

    model.eval()
    with torch.inference_mode():
        reconstruction, indices = model(test)
    mse = float(torch.mean((reconstruction - test) ** 2))
    used = int(indices.unique().numel())
    print(f"trained in {seconds:.1f} s; test MSE {mse:.5f}; {used}/{model.vq.codebook_size} codes used on the test set")

    checkpoint = save_example(model, args.out / "digits_vqvae.safetensors", overwrite=args.force)
    print(f"wrote {checkpoint}")
    if args.ship:
        if SHIPPED.exists() and not args.force:
            print(f"error: {SHIPPED} exists; pass --force to replace it", file=sys.stderr)
            return 1
        shutil.copyfile(checkpoint, SHIPPED)
        print(f"wrote {SHIPPED}")

    if not args.no_plots:
        import plots

        with torch.inference_mode():
            shown = test[:12]
            written = [
                plots.reconstruction_grid(shown, [("VQ-VAE", model(shown)[0])],
                                          args.out / "digits_vqvae_reconstructions.png",
                                          f"DigitsVQVAE: test digits and their reconstructions (MSE {mse:.4f})"),
                plots.usage_histogram([("codebook", indices)], model.vq.codebook_size,
                                      args.out / "digits_vqvae_usage.png",
                                      f"DigitsVQVAE: code usage over {test.shape[0]} test digits x 16 tokens"),
            ]
        written.append(plots.health_curves(health, model.vq.codebook_size, args.out / "digits_vqvae_health.png",
                                           f"{type(model).__name__}: codebook health during training (EMA sizes)"))
        if None in written:
            print("matplotlib is not installed: no plots (pip install matplotlib)")
        else:
            print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
