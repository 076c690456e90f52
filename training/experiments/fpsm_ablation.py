"""Seed 004 (Kim et al.) on phantoms: feature pyramid sum vs the backbone alone, with and
without diseased-area data augmentation (DADAM); CXR-LT's mAP and its tail.

The paper (MIMIC-CXR, 26 classes, TResNet): the 4th + 3rd + 2nd level sum gives mAP 33.10 %
against 32.77 % for the 4th level alone (Table 1a); fine-tuning on the DADAM-augmented set
33.37 % (Table 2), with ~1 % AUC gained on the rarest classes. Here: the cxr-findings config
(training/configs/findings*.yaml) trained four ways on the same phantom seeds, scored by
PyTorch on its test split (mAP, head/medium/tail means, per-class AP), `--trials` seeds each.

    python -m training.experiments.fpsm_ablation --config training/configs/findings.yaml \
        --trials 3 --out docs/findings_ablation.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.findings import FeaturePyramidSum, FindingsConfig, FindingsFilm, load_config
from training.findings_build import (
    findings_data,
    label_groups,
    mean_ap,
    torch_scores,
    train_findings,
    training_shares,
)
from training.metrics import average_precision, group_means
from training.sources import Source
from training.streaming import seed_everything

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "findings-tiny.yaml"
VARIANTS = {
    "backbone alone (4th)": ([4], False),
    "FPN sum (4th+3rd+2nd)": ([4, 3, 2], False),
    "backbone alone + DADAM": ([4], True),
    "FPN sum + DADAM": ([4, 3, 2], True),
}


def run_variant(
    config: FindingsConfig, levels: list[int], dadam: bool, seed: int
) -> dict[str, float]:
    """Train one variant with `seed`; its test mAP, group means and per-class AP."""
    varied = config.model_copy(
        update={
            "seed": seed,
            "model": config.model.model_copy(update={"levels": levels}),
            "dadam": config.dadam.model_copy(update={"enabled": dadam}),
        }
    )
    seed_everything(seed, varied.threads)
    source = Source()
    data = findings_data(varied, source)
    model = FeaturePyramidSum(varied.model, len(varied.labels))
    train_findings(model, data, varied, source)
    film = FindingsFilm(tuple(varied.labels), varied.input_size, varied.phantom_size)
    out, truth = torch_scores(model, data.splits["test"], film)
    scores = out[:, 1:]
    ap = {k: average_precision(scores[:, j], truth[:, j]) for j, k in enumerate(varied.labels)}
    groups = label_groups(training_shares(data.splits["train"], varied.labels), varied)
    return {"mAP": mean_ap(scores, truth), **group_means(ap, groups), **ap}


def main(argv: Sequence[str] | None = None) -> int:
    top = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    top.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    top.add_argument("--trials", type=int, default=1)
    top.add_argument("--out", type=Path, help="write the Markdown table here too")
    args = top.parse_args(argv)
    config = load_config(args.config)
    started = time.monotonic()
    rows, columns = [], ["mAP", "head", "medium", "tail", *config.labels]
    for name, (levels, dadam) in VARIANTS.items():
        trials = [run_variant(config, levels, dadam, config.seed + t) for t in range(args.trials)]
        means = {c: float(np.nanmean([t.get(c, np.nan) for t in trials])) for c in columns}
        rows.append(f"| {name} | " + " | ".join(f"{means[c]:.4f}" for c in columns) + " |")
    table = "\n".join(
        [
            f"Config {args.config}, {args.trials} trial(s) each, test split, "
            f"{time.monotonic() - started:.0f} s.\n",
            "| variant | " + " | ".join(columns) + " |",
            "|---" * (len(columns) + 1) + "|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
