"""Trained weights between `cadnode-train train` and `cadnode-train build --checkpoint`.

Training is the long step; calibration, export and the bundle are quick. A checkpoint lets a
site train once and rebuild the bundle (new operating points, a new export) from the same
weights. It records the engine and the SHA-256 of the training config it was trained with,
and is refused for any other: weights and the config describing them never drift apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cadnode.core.yamlfile import ConfigError


def config_digest(config_path: Path) -> str:
    return hashlib.sha256(config_path.read_bytes()).hexdigest()


def save_checkpoint(model: nn.Module, path: Path, *, engine: str, config_path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "engine": engine,
            "config": str(config_path),
            "config_sha256": config_digest(config_path),
            "state_dict": model.state_dict(),
        },
        path,
    )


def fit(
    model: nn.Module,
    train: Callable[[], object],
    *,
    checkpoint: Path | None,
    engine: str,
    config_path: Path,
) -> None:
    """Train `model` in place, or load the weights a checkpoint holds for this very config."""
    if checkpoint is None:
        train()
        return
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise ConfigError([f"{checkpoint}: cannot read the checkpoint: {error}"]) from error
    problems = []
    if saved.get("engine") != engine:
        problems.append(f"{checkpoint}: trained for {saved.get('engine')!r}, not {engine!r}")
    if saved.get("config_sha256") != config_digest(config_path):
        problems.append(
            f"{checkpoint}: trained with another config ({saved.get('config')}), "
            f"not {config_path} as it is now; train again"
        )
    if problems:
        raise ConfigError(problems)
    model.load_state_dict(saved["state_dict"])
