"""Training from a dataset index one record at a time: a torch `Dataset` that reads and
preprocesses each record when a batch asks for it (the daemon's own preprocessing,
cadnode.infer.preprocess), a `DataLoader` with worker processes, and the loop around it:
device and mixed precision, deterministic seeds, resumable checkpoints, early stopping on a
validation metric, per-epoch metrics in a CSV and TensorBoard.

Memory does not grow with the dataset: the index holds paths and labels, a batch holds
`batch_size` images, and what each epoch draws is decided from the labels alone (the engine's
sampler: batch control, over- or undersampling). Every item is drawn with its own seed
(from the run's seed, the epoch and its place in the epoch), so augmentation in worker
processes is reproducible and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import csv
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import structlog
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.preprocess import fit_square, image_to_tensor
from training.records import Record

log = structlog.get_logger()

CHECKPOINT = "checkpoint.pt"
METRICS_CSV = "metrics.csv"
TENSORBOARD = "tensorboard"
Item = tuple[int, int]  # (record index, item seed)
# A record as model input and targets (arrays; evaluation samples may carry more, e.g. a
# volume's geometry and boxes, handed over by `alone`).
Sample = Callable[[Record, np.random.Generator], tuple[Any, ...]]
BatchPlan = Callable[[np.random.Generator], list[np.ndarray]]
Step = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]  # a batch's loss


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


# --- reading one film ------------------------------------------------------------------------


def film_tensor(path: Path, size: int) -> np.ndarray:
    """(1, S, S) float32 in [0, 1]: DICOM through the daemon's `image_to_tensor`; a PNG/JPG
    (Montgomery, Shenzhen, CXR-LT's JPGs) min-max normalised and fitted the same way."""
    if path.suffix.lower() == ".dcm":
        return image_to_tensor(pydicom.dcmread(path), size, limit=DEFAULT_LIMIT)[0]
    with Image.open(path) as image:
        values = np.asarray(image.convert("F"), dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return fit_square(values, size)[0][None]


# --- dataset, sampler, loader ----------------------------------------------------------------


class RecordDataset(Dataset[tuple[np.ndarray, ...]]):
    """Items are (record index, seed): the record is read and `sample`d with that seed."""

    def __init__(self, records: Sequence[Record], sample: Sample) -> None:
        self.records = list(records)
        self.sample = sample

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: Item | int) -> tuple[np.ndarray, ...]:
        index, seed = item if isinstance(item, tuple) else (item, 0)
        return self.sample(self.records[index], np.random.default_rng(seed))


class EpochBatches(Sampler[list[Item]]):
    """One epoch of batches from `plan` (an engine's sampler over labels), drawn with a
    generator seeded by (seed, epoch); each item gets a seed of its own for augmentation."""

    def __init__(self, plan: BatchPlan, seed: int) -> None:
        self.plan, self.seed, self.epoch = plan, seed, 0

    def batches(self) -> list[list[Item]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        planned = self.plan(rng)
        seeds = rng.integers(0, 2**31, size=sum(len(b) for b in planned))
        out, position = [], 0
        for batch in planned:
            out.append([(int(i), int(seeds[position + k])) for k, i in enumerate(batch)])
            position += len(batch)
        return out

    def __iter__(self) -> Iterator[list[Item]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def in_order(count: int, batch_size: int) -> Sampler[list[Item]]:
    """Every record once, in order (evaluation), item seed 0 (no augmentation draws)."""
    plan: BatchPlan = lambda _: [  # noqa: E731
        np.arange(start, min(count, start + batch_size)) for start in range(0, count, batch_size)
    ]
    return EpochBatches(plan, 0)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # each worker reads one record; the main process trains


def concatenated(items: Sequence[tuple[np.ndarray, ...]]) -> list[torch.Tensor]:
    """A batch of items that each hold several rows (a DBT volume's slab of slices): every
    part joined along its first axis, so the batch is all their rows."""
    return [torch.from_numpy(np.concatenate(parts)) for parts in zip(*items, strict=True)]


def alone(items: Sequence[Any]) -> Any:
    """A batch of one item, handed over as the sample made it (a whole volume with its
    geometry and boxes, for evaluation one volume at a time)."""
    (item,) = items
    return item


def loader(
    records: Sequence[Record],
    sample: Sample,
    batches: Sampler[list[Item]],
    workers: int,
    collate: Callable[[Sequence[Any]], Any] | None = None,
) -> DataLoader[tuple[np.ndarray, ...]]:
    """`collate` (a module-level function: worker processes pickle it) joins a batch's
    items; default torch's stacking."""
    return DataLoader(
        RecordDataset(records, sample),
        batch_sampler=batches,
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate,
    )


# --- device and determinism ------------------------------------------------------------------


def pick_device() -> torch.device:
    """CUDA where torch sees a GPU (trained under autocast), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> Any:
    """Mixed precision on CUDA; on the CPU full float32 (deterministic, exportable as is)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def seed_everything(seed: int, threads: int) -> None:
    """Same seed, same threads, same weights: deterministic algorithms where the platform has
    them (warn_only: a CUDA op without one warns instead of failing the run)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


# --- the loop --------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """Where a run keeps its checkpoint and metrics, and when it stops."""

    run_dir: Path | None = None  # checkpoint.pt, metrics.csv, tensorboard/
    resume: bool = False
    patience: int | None = None  # epochs without a better validation metric before stopping
    workers: int = field(default_factory=default_workers)
    stop_after: int | None = None  # end the run after this many epochs (tests, time boxes)


@dataclass
class Schedule:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    step_scheduler_per_batch: bool = True


@dataclass
class History:
    rows: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = -math.inf
    stopped_early: bool = False


def fit(
    model: nn.Module,
    *,
    step: Step,
    train: DataLoader[tuple[np.ndarray, ...]],
    sampler: EpochBatches,
    schedule: Schedule,
    epochs: int,
    validate: Callable[[nn.Module], float] | None,
    metric: str,
    options: RunOptions,
) -> History:
    """Train `model` (its weights end as the best epoch's by `validate`, higher is better,
    when one is given; else the last epoch's). Checkpoints after every epoch hold the model,
    optimizer, scheduler, epoch, best weights and RNG states: `options.resume` continues from
    one exactly as the uninterrupted run would have gone on."""
    device = pick_device()
    model.to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    history, best_state, first = History(), None, 0
    checkpoint = options.run_dir / CHECKPOINT if options.run_dir else None
    if options.resume and checkpoint and checkpoint.exists():
        first, history, best_state = _restore(checkpoint, model, schedule, scaler)
        log.info("training.resumed", epoch=first, checkpoint=str(checkpoint))
    writer = _tensorboard(options.run_dir)
    last = epochs if options.stop_after is None else min(epochs, first + options.stop_after)
    for epoch in range(first, last):
        sampler.epoch = epoch
        loss = _epoch(model, step, train, schedule, scaler, device)
        row = {"epoch": float(epoch + 1), "loss": loss, "lr": _lr(schedule)}
        if validate is not None:
            model.eval()
            row[metric] = validate(model)
            if row[metric] > history.best_metric:
                history.best_metric, history.best_epoch = row[metric], epoch
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        history.rows.append(row)
        _record(options.run_dir, writer, row)
        waited = epoch - history.best_epoch
        history.stopped_early = bool(options.patience and validate and waited >= options.patience)
        if checkpoint:
            _save(checkpoint, model, schedule, scaler, epoch + 1, history, best_state)
        log.info("training.epoch", **{k: round(v, 6) for k, v in row.items()})
        if history.stopped_early:
            break
    if writer is not None:
        writer.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to("cpu").eval()
    return history


def _epoch(
    model: nn.Module,
    step: Step,
    train: DataLoader[tuple[np.ndarray, ...]],
    schedule: Schedule,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> float:
    model.train()
    total, batches = 0.0, 0
    for batch in train:
        tensors = [part.to(device, non_blocking=True) for part in batch]
        schedule.optimizer.zero_grad()
        with autocast(device):
            loss = step(model, tensors)
        scaler.scale(loss).backward()
        scaler.step(schedule.optimizer)
        scaler.update()
        if schedule.scheduler is not None and schedule.step_scheduler_per_batch:
            schedule.scheduler.step()
        total += float(loss.item())
        batches += 1
    if schedule.scheduler is not None and not schedule.step_scheduler_per_batch:
        schedule.scheduler.step()
    if batches == 0:
        raise ValueError("the training split is smaller than one batch")
    return total / batches


def _lr(schedule: Schedule) -> float:
    return float(schedule.optimizer.param_groups[0]["lr"])


def _tensorboard(run_dir: Path | None) -> Any:
    if run_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter  # the `train` extra's tensorboard

    return SummaryWriter(str(run_dir / TENSORBOARD))


def _record(run_dir: Path | None, writer: Any, row: dict[str, float]) -> None:
    if run_dir is None:
        return
    path = run_dir / METRICS_CSV
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        if new:
            out.writerow(list(row))
        out.writerow([f"{value:.6g}" for value in row.values()])
    for name, value in row.items():
        if name != "epoch":
            writer.add_scalar(name, value, int(row["epoch"]))
    writer.flush()


def _save(
    path: Path,
    model: nn.Module,
    schedule: Schedule,
    scaler: torch.amp.GradScaler,
    epochs_done: int,
    history: History,
    best_state: dict[str, torch.Tensor] | None,
) -> None:
    """Written beside and renamed over: a run killed mid-write keeps its last checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epochs_done": epochs_done,
        "model": model.state_dict(),
        "optimizer": schedule.optimizer.state_dict(),
        "scheduler": schedule.scheduler.state_dict() if schedule.scheduler else None,
        "scaler": scaler.state_dict(),
        "history": {
            "rows": history.rows,
            "best_epoch": history.best_epoch,
            "best_metric": history.best_metric,
        },
        "best": best_state,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def _restore(
    path: Path, model: nn.Module, schedule: Schedule, scaler: torch.amp.GradScaler
) -> tuple[int, History, dict[str, torch.Tensor] | None]:
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    model.load_state_dict(state["model"])
    schedule.optimizer.load_state_dict(state["optimizer"])
    if schedule.scheduler is not None and state["scheduler"] is not None:
        schedule.scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    saved = state["history"]
    history = History(saved["rows"], saved["best_epoch"], saved["best_metric"])
    return int(state["epochs_done"]), history, state["best"]


def predictions(
    model: nn.Module, batches: DataLoader[tuple[np.ndarray, ...]]
) -> tuple[np.ndarray, ...]:
    """The model's outputs over a loader in order, with every other part of each batch
    (labels, masks) concatenated: (outputs, part 1, part 2, ...)."""
    device = next(model.parameters()).device
    collected: list[list[np.ndarray]] = []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            out = model(batch[0].to(device)).float().cpu().numpy()
            parts = [out, *(part.numpy() for part in batch[1:])]
            collected = collected or [[] for _ in parts]
            for bucket, part in zip(collected, parts, strict=True):
                bucket.append(part)
    return tuple(np.concatenate(bucket) for bucket in collected)
