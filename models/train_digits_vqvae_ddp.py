"""Train the DigitsVQVAE example with DistributedDataParallel, one process per rank, synced codebook.

    torchrun --nproc-per-node 2 models/train_digits_vqvae_ddp.py
    torchrun --nproc-per-node 4 --master-addr 127.0.0.1 --master-port 29511 models/train_digits_vqvae_ddp.py --steps 300

Every rank draws the same global batch of --batch-size digits and trains on its slice of it. DDP
averages the gradients of the encoder and decoder; the VectorQuantize inside syncs its EMA
codebook itself (sync_codebook, on by default in a process group), so DDP's per-forward buffer
broadcast is switched off. At the end rank 0 evaluates the unwrapped model (no collective) and
every rank checks that it holds the same codebook bits. gloo on CPU, NCCL when CUDA is there.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vqdeploy.examples import DigitsVQVAE, load_digits_tensor, save_example, split_digits


class TrainingLosses(nn.Module):
    """DDP only prepares the gradient sync in `forward`: route `model.losses` through it."""

    def __init__(self, model: DigitsVQVAE):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.losses(images)


def without_buffer_broadcast() -> dict[str, bool]:
    """DDP's argument that stops its buffer broadcast before every forward (renamed in torch 2.13)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="training batches (default 500)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split over the ranks")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", type=Path, default=None, help="write the trained checkpoint here (rank 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        print("error: start this script with torchrun, e.g. torchrun --nproc-per-node 2 " + sys.argv[0], file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    try:
        train, test = split_digits(load_digits_tensor())
        train, test = train.to(device), test.to(device)
        torch.manual_seed(args.seed)
        model = DigitsVQVAE().to(device)
        step_losses = DistributedDataParallel(TrainingLosses(model), **without_buffer_broadcast())
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        generator = torch.Generator().manual_seed(args.seed)  # the same global batches on every rank
        model.train()
        for _ in range(args.steps):
            batch = train[torch.randint(0, train.shape[0], (args.batch_size,), generator=generator).to(device)]
            losses = step_losses(batch.tensor_split(world)[rank])
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()

        codebook = model.vq.codebook.detach().contiguous()
        gathered = [torch.empty_like(codebook) for _ in range(world)]
        dist.all_gather(gathered, codebook)
        equal = all(torch.equal(codebook, other) for other in gathered)
        if rank == 0:
            model.eval()
            with torch.inference_mode():
                reconstruction, indices = model(test)  # the unwrapped module: no collective in eval
            mse = float(torch.mean((reconstruction - test) ** 2))
            used = int(indices.unique().numel())
            print(f"{world} ranks, {args.steps} steps of {args.batch_size} digits: test MSE {mse:.5f}; "
                  f"{used}/{model.vq.codebook_size} codes used; codebooks bitwise equal on every rank: {equal}")
            if args.out is not None:
                print(f"wrote {save_example(model.cpu(), args.out, overwrite=True)}")
        # Every rank leaves together: a rank that tore its gloo group down while rank 0 was still
        # evaluating aborted at exit ("terminate called without an active exception").
        dist.barrier()
        return 0 if equal else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
