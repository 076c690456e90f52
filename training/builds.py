"""Train and build each engine: what `cadnode-train train` and `build` run (needs torch).

The segmenter's and the detector's own modules hold theirs; the rule-out engine's are here
because its manifest and card live in training.bundle, which imports the rule-out module.
Training streams records from disk (training.streaming), from the config's phantom seeds or
a dataset folder (`--data`, training.sources).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ruamel.yaml import YAML
from torch import nn

from cadnode.infer.bundle import Bundle
from training import detector, findings_build, segmenter
from training.bundle import MODEL_FILE, staged, write_ruleout_bundle
from training.checkpoint import fit, save_checkpoint
from training.export import ExportMismatch, check_against_torch, export_onnx, onnx_probabilities
from training.metrics import auc
from training.population import ruleout_population
from training.records import Record
from training.ruleout import (
    RuleoutConfig,
    RuleoutNet,
    epoch_batches,
    evaluate,
    load_config,
    steps_per_epoch,
)
from training.sources import ChestFilm, Source, folder_splits, phantom_chest_splits, resolved
from training.streaming import (
    EpochBatches,
    Schedule,
    in_order,
    loader,
    predictions,
    seed_everything,
)
from training.streaming import fit as fit_streaming

__all__ = ["BUILDERS", "TRAINERS", "ExportMismatch", "resolved", "save_checkpoint"]

CHECK_BATCH = 64  # test films run through both PyTorch and ONNX Runtime after export
EVALUATION_BATCH = 64


def ruleout_splits(
    config: RuleoutConfig, source: Source
) -> tuple[dict[str, list[Record]], str | None]:
    """The records of each split and, for a dataset folder, the sentence describing them."""
    if source.data is None:
        seeds = {name: split.seeds for name, split in config.splits.named().items()}
        return phantom_chest_splits(seeds, config.positive_fraction), None
    return folder_splits(source, config.seed)


def labels_of(records: Sequence[Record]) -> np.ndarray:
    return np.array([record.abnormal for record in records], dtype=np.float32)


def train_ruleout(
    model: RuleoutNet,
    splits: dict[str, list[Record]],
    config: RuleoutConfig,
    source: Source,
) -> None:
    """Streamed: batch control over the training labels, AdamW with a one-cycle schedule on
    binary cross-entropy, the validation AUC per epoch (early stopping with --patience)."""
    spec, labels = config.training, labels_of(splits["train"])
    steps = steps_per_epoch(labels, spec)
    if steps == 0:
        raise ValueError(f"training set of {len(labels)} is smaller than one batch")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    schedule = Schedule(
        optimizer,
        torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=spec.learning_rate, total_steps=spec.epochs * steps
        ),
    )
    sampler = EpochBatches(lambda rng: epoch_batches(labels, spec, rng), config.seed)
    sample = ChestFilm(
        config.input_size, config.phantom_size, augment=spec.augment, difficulty=config.difficulty
    )
    plain = ChestFilm(config.input_size, config.phantom_size, difficulty=config.difficulty)
    loss_fn = nn.BCEWithLogitsLoss()

    def step(net: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        assert isinstance(net, RuleoutNet)
        loss: torch.Tensor = loss_fn(net.logit(batch[0]), batch[1].float())
        return loss

    def validate(net: nn.Module) -> float:
        scores, truth = predictions(net, evaluation_loader(splits["validation"], plain, source))
        return auc(scores, truth) if 0 < truth.sum() < len(truth) else 0.0

    fit_streaming(
        model,
        step=step,
        train=loader(splits["train"], sample, sampler, source.run.workers),
        sampler=sampler,
        schedule=schedule,
        epochs=spec.epochs,
        validate=validate if source.data is not None or source.run.patience else None,
        metric="validation_auc",
        options=source.run,
    )


def evaluation_loader(records: Sequence[Record], sample: ChestFilm, source: Source) -> Any:
    return loader(records, sample, in_order(len(records), EVALUATION_BATCH), source.run.workers)


def trained_ruleout(
    config_path: Path, checkpoint: Path | None = None, source: Source | None = None
) -> tuple[RuleoutConfig, dict[str, list[Record]], str | None, RuleoutNet]:
    """The config, its splits (records) and their description, and the model trained on them
    (or the checkpoint's weights)."""
    config = load_config(config_path)
    source = resolved(source or Source(), "ruleout")
    seed_everything(config.seed, config.threads)
    splits, description = ruleout_splits(config, source)
    model = RuleoutNet(config.model.channels)
    fit(
        model,
        lambda: train_ruleout(model, splits, config, source),
        checkpoint=checkpoint,
        engine="ruleout",
        config_path=config_path,
    )
    return config, splits, description, model


def onnx_scores(
    onnx_path: Path, records: Sequence[Record], sample: ChestFilm, config: RuleoutConfig
) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's P(abnormal) of every record, streamed a batch at a time, and labels."""
    scores, labels = [], []
    for images, truth in loader(records, sample, in_order(len(records), EVALUATION_BATCH), 0):
        scores.append(onnx_probabilities(onnx_path, images.numpy(), config.threads))
        labels.append(truth.numpy())
    return np.concatenate(scores), np.concatenate(labels)


def build_ruleout(
    config_path: Path,
    out: Path,
    rebuild: str,
    checkpoint: Path | None = None,
    source: Source | None = None,
) -> Bundle:
    """Train (or take a checkpoint's weights), export, check ONNX against PyTorch,
    calibrate, write the bundle.

    Calibration and test metrics use ONNX Runtime scores of the exported file: the
    thresholds are set on exactly the numbers the daemon will compare them with.
    """
    config, splits, description, model = trained_ruleout(config_path, checkpoint, source)
    sample = ChestFilm(config.input_size, config.phantom_size, difficulty=config.difficulty)
    with staged(out) as folder:
        onnx_path = folder / MODEL_FILE
        export_onnx(model, onnx_path, config.input_size)
        check = np.stack(
            [sample(r, np.random.default_rng(0))[0] for r in splits["test"][:CHECK_BATCH]]
        )
        difference = check_against_torch(model, onnx_path, check, config.threads)
        validation = onnx_scores(onnx_path, splits["validation"], sample, config)
        test_scores, _ = onnx_scores(onnx_path, splits["test"], sample, config)
        evaluation = evaluate(validation, test_scores, splits["test"], config.calibration)
        write_ruleout_bundle(
            folder,
            config=config,
            cases=splits,
            evaluation=evaluation,
            export_difference=difference,
            rebuild=rebuild,
            description=description,
            population=ruleout_population(
                splits["train"],
                test_scores,
                [point.threshold for point in evaluation.operating_points.values()],
                config.phantom_size,
            ),
        )
    return Bundle(out)


@contextmanager
def config_with(path: Path, **changes: object) -> Iterator[Path]:
    """The config at `path` with top-level keys changed (`build --version --seed`: a second
    version of an engine, cadnode/infer/releases.py), as a file for the build's duration."""
    if not changes:
        yield path
        return
    yaml = YAML()
    data = yaml.load(path.read_text())
    for key, value in changes.items():
        data[key] = value
    with tempfile.TemporaryDirectory(prefix="cadnode-config-") as folder:
        derived = Path(folder) / path.name
        with derived.open("w") as handle:
            yaml.dump(data, handle)
        yield derived


# By engine name: (config path, checkpoint=None, source=None) -> (config, ..., trained model).
TRAINERS: dict[str, Callable[..., tuple[Any, ...]]] = {
    "ruleout": trained_ruleout,
    "segmenter": segmenter.trained,
    "dbt": detector.trained,
    "findings": findings_build.trained,
}
# By engine name: (config path, out folder, rebuild command, checkpoint, source) -> the bundle.
BUILDERS: dict[str, Callable[..., Bundle]] = {
    "ruleout": build_ruleout,
    "segmenter": segmenter.build,
    "dbt": detector.build,
    "findings": findings_build.build,
}
