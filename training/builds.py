"""Train and build each engine: what `cadnode-train train` and `build` run (needs torch).

The segmenter's and the detector's own modules hold theirs; the rule-out engine's are here
because its manifest and card live in training.bundle, which imports the rule-out module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cadnode.infer.bundle import Bundle
from cadnode.infer.phantoms.chest import Case, plan_cases
from training import detector, segmenter
from training.bundle import MODEL_FILE, staged, write_ruleout_bundle
from training.checkpoint import fit, save_checkpoint
from training.export import ExportMismatch, check_against_torch, export_onnx, onnx_probabilities
from training.ruleout import (
    RuleoutConfig,
    RuleoutNet,
    SplitTensors,
    evaluate,
    load_config,
    make_deterministic,
    tensors,
    train,
)

__all__ = ["BUILDERS", "TRAINERS", "ExportMismatch", "save_checkpoint"]

CHECK_BATCH = 64  # test films run through both PyTorch and ONNX Runtime after export


def trained_ruleout(
    config_path: Path, checkpoint: Path | None = None
) -> tuple[RuleoutConfig, dict[str, list[Case]], SplitTensors, RuleoutNet]:
    """The config, its cases and tensors, and the model trained on them (or the checkpoint's)."""
    config = load_config(config_path)
    make_deterministic(config.seed, config.threads)
    cases = {
        name: plan_cases(split.seeds, config.positive_fraction)
        for name, split in config.splits.named().items()
    }
    data = {
        name: tensors(split_cases, config.phantom_size, config.input_size, name)
        for name, split_cases in cases.items()
    }
    model = RuleoutNet(config.model.channels)
    fit(
        model,
        lambda: train(model, *data["train"], config.training, config.seed),
        checkpoint=checkpoint,
        engine="ruleout",
        config_path=config_path,
    )
    return config, cases, data, model


def build_ruleout(
    config_path: Path, out: Path, rebuild: str, checkpoint: Path | None = None
) -> Bundle:
    """Train on phantoms (or take a checkpoint's weights), export, check ONNX against
    PyTorch, calibrate, write the bundle.

    Calibration and test metrics use ONNX Runtime scores of the exported file: the
    thresholds are set on exactly the numbers the daemon will compare them with.
    """
    config, cases, data, model = trained_ruleout(config_path, checkpoint)
    with staged(out) as folder:
        onnx_path = folder / MODEL_FILE
        export_onnx(model, onnx_path, config.input_size)
        difference = check_against_torch(
            model, onnx_path, data["test"][0][:CHECK_BATCH], config.threads
        )
        scores = {
            name: onnx_probabilities(onnx_path, data[name][0], config.threads)
            for name in ("validation", "test")
        }
        evaluation = evaluate(
            (scores["validation"], data["validation"][1]),
            scores["test"],
            cases["test"],
            config.calibration,
        )
        write_ruleout_bundle(
            folder,
            config=config,
            cases=cases,
            evaluation=evaluation,
            export_difference=difference,
            rebuild=rebuild,
        )
    return Bundle(out)


# By engine name: (config path, checkpoint=None) -> (config, cases, data, trained model).
TRAINERS: dict[str, Callable[..., tuple[Any, ...]]] = {
    "ruleout": trained_ruleout,
    "segmenter": segmenter.trained,
    "dbt": detector.trained,
}
# By engine name: (config path, out folder, rebuild command, checkpoint) -> the bundle.
BUILDERS: dict[str, Callable[[Path, Path, str, Path | None], Bundle]] = {
    "ruleout": build_ruleout,
    "segmenter": segmenter.build,
    "dbt": detector.build,
}
