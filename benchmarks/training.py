"""Training throughput: the streaming loader (training.streaming, records read from disk one
at a time, `--workers` processes) against the in-memory path (every film preprocessed once
and stacked with np.stack, as the builders used to), on the same phantom chest folder and the
same rule-out model.

Figures: images per second of one training epoch each way (the in-memory path's one-off
stacking time reported apart), and their ratio streaming / in-memory.

    .venv/bin/python benchmarks/training.py [--films 64] [--size 128] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

# The repository instead of this folder: benchmarks/triton.py would shadow the `triton`
# module torch's optimizers import.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from training.phantom_sets import write_chest_set  # noqa: E402
from training.records import index_folder  # noqa: E402
from training.ruleout import RuleoutNet, TrainSpec, epoch_batches  # noqa: E402
from training.sources import ChestFilm  # noqa: E402
from training.streaming import EpochBatches, loader  # noqa: E402


def step(
    model: RuleoutNet, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    optimizer.zero_grad()
    loss = nn.functional.binary_cross_entropy_with_logits(model.logit(x), y)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", type=int, default=64)
    parser.add_argument("--size", type=int, default=128, help="model input, px")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = TrainSpec(epochs=1, batch_size=args.batch, learning_rate=1e-3)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_chest_set(root, count=args.films, first_seed=0, positive_fraction=0.5, size=256)
        records = index_folder(root, "cxrlt")
        labels = np.array([r.abnormal for r in records], dtype=np.float32)
        sample = ChestFilm(args.size, 256)
        plan = lambda rng: epoch_batches(labels, spec, rng)  # noqa: E731

        model = RuleoutNet([8, 16, 32])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        started = time.perf_counter()
        images = np.stack([sample(r, np.random.default_rng(0))[0] for r in records])
        stacking = time.perf_counter() - started
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        started, seen = time.perf_counter(), 0
        for batch in plan(np.random.default_rng(0)):
            index = torch.from_numpy(batch)
            step(model, optimizer, x[index], y[index])
            seen += len(batch)
        memory = seen / (time.perf_counter() - started)

        model = RuleoutNet([8, 16, 32])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        started, seen = time.perf_counter(), 0
        for xb, yb in loader(records, sample, EpochBatches(plan, 0), args.workers):
            step(model, optimizer, xb, yb)
            seen += len(xb)
        streaming = seen / (time.perf_counter() - started)
    print(f"{args.films} films at {args.size} px, batch {args.batch}, {args.workers} worker(s)")
    print(f"in-memory: {memory:8.1f} images/s (stacking the set first took {stacking:.2f} s)")
    print(f"streaming: {streaming:8.1f} images/s (reading and preprocessing every epoch)")
    print(f"ratio streaming / in-memory: {streaming / memory:.3f}")


if __name__ == "__main__":
    main()
