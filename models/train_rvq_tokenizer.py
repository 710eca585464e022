"""Train the DigitsRVQTokenizer example (residual VQ, 4 stages) on scikit-learn's digits.

    python models/train_rvq_tokenizer.py                      # -> models/out/

Writes the checkpoint, a grid of reconstructions from the first 1, 2, ... stages (coarse to
fine), and the code usage of every stage. About 40 s on 2 CPU cores. Needs scikit-learn, and
matplotlib for the plots (pip install -e ".[models]").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vqdeploy.examples import DigitsRVQTokenizer, fit, load_digits_tensor, save_example, split_digits

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training batches (default 1000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these convolutions are tiny, extra threads only spin)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="folder for plots and the checkpoint")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = split_digits(load_digits_tensor())

    model = DigitsRVQTokenizer()
    start = time.perf_counter()
    health: list = []
    fit(model, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, health=health)
    seconds = time.perf_counter() - start

    model.eval()
    stages = model.rvq.num_quantizers
    with torch.inference_mode():
        _, indices = model(test)
        # the first q stages; the others marked dropped (-1), which decodes to zeros
        by_stages = [(q, model.decode(torch.cat([indices[:q], torch.full_like(indices[q:], -1)])))
                     for q in range(1, stages + 1)]
    print(f"trained in {seconds:.1f} s")
    for q, reconstruction in by_stages:
        print(f"  first {q} stage(s): test MSE {float(torch.mean((reconstruction - test) ** 2)):.5f}")

    checkpoint = save_example(model, args.out / "digits_rvq_tokenizer.safetensors", overwrite=args.force)
    print(f"wrote {checkpoint}")

    if not args.no_plots:
        import plots

        shown = 12
        written = [
            plots.reconstruction_grid(test[:shown], [(f"{q} stage{'s' * (q > 1)}", r[:shown]) for q, r in by_stages],
                                      args.out / "digits_rvq_reconstructions.png",
                                      "DigitsRVQTokenizer: reconstructions from the first q residual stages"),
            plots.usage_histogram([(f"stage {q}", indices[q]) for q in range(stages)], model.rvq.codebook_size,
                                  args.out / "digits_rvq_usage.png",
                                  "DigitsRVQTokenizer: code usage per stage (test digits)"),
        ]
        written.append(plots.health_curves(health, model.rvq.codebook_size, args.out / "digits_rvq_health.png",
                                           f"{type(model).__name__}: codebook health during training (EMA sizes)"))
        if None in written:
            print("matplotlib is not installed: no plots (pip install matplotlib)")
        else:
            print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
