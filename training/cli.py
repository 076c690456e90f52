"""`cadnode-train`: write phantom datasets, build engine bundles.

cadnode-train phantoms --kind cxr --count 100 --out data/cxr [--positive-fraction 0.5]
cadnode-train build ruleout --config training/configs/ruleout.yaml --out engines/cxr-ruleout
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from cadnode.infer.bundle import Bundle
from cadnode.yamlfile import ConfigError
from training.bundle import MODEL_FILE, staged, write_bundle
from training.export import ExportMismatch, check_against_torch, export_onnx, onnx_probabilities
from training.phantoms import write_chest_radiograph
from training.ruleout import (
    RuleoutNet,
    evaluate,
    load_config,
    make_deterministic,
    plan_cases,
    tensors,
    train,
)

LABELS_CSV = "labels.csv"
CHECK_BATCH = 64  # test films run through both PyTorch and ONNX Runtime after export


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.handler(args))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="cadnode-train", description=__doc__.splitlines()[0])
    commands = top.add_subparsers(dest="command", required=True)

    phantoms = commands.add_parser("phantoms", help="write synthetic DICOM films + labels.csv")
    phantoms.add_argument("--kind", choices=["cxr", "dbt"], required=True)
    phantoms.add_argument("--count", type=int, required=True)
    phantoms.add_argument("--out", type=Path, required=True)
    phantoms.add_argument("--positive-fraction", type=float, default=0.5)
    phantoms.add_argument("--seed", type=int, default=0, help="first phantom seed")
    phantoms.add_argument("--size", type=int, default=512, help="film side, pixels")
    phantoms.set_defaults(handler=write_phantoms)

    build = commands.add_parser("build", help="train, calibrate, export and bundle an engine")
    build.add_argument("engine", choices=["ruleout"])
    build.add_argument("--config", type=Path, default=Path("training/configs/ruleout.yaml"))
    build.add_argument("--out", type=Path, default=Path("engines/cxr-ruleout"))
    build.set_defaults(handler=build_command)
    return top


def write_phantoms(args: argparse.Namespace) -> int:
    """DICOM files named by index plus labels.csv (file,abnormal,opacity,pneumothorax)."""
    if args.kind == "dbt":
        print("cadnode-train phantoms: --kind dbt is not built yet (only cxr)", file=sys.stderr)
        return 2
    if args.count <= 0 or not 0 <= args.positive_fraction <= 1:
        print(
            "cadnode-train phantoms: need --count > 0, 0 <= --positive-fraction <= 1",
            file=sys.stderr,
        )
        return 2
    cases = plan_cases(range(args.seed, args.seed + args.count), args.positive_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / LABELS_CSV).open("w", newline="", encoding="utf-8") as handle:
        labels = csv.writer(handle)
        labels.writerow(["file", "abnormal", "opacity", "pneumothorax"])
        for index, case in enumerate(tqdm(cases, desc="phantoms", unit="film")):
            name = f"cxr-{index:05d}.dcm"
            write_chest_radiograph(
                args.out / name,
                seed=case.seed,
                patient_id=case.patient_id,
                opacity=case.opacity,
                pneumothorax=case.pneumothorax,
                size=args.size,
            )
            labels.writerow(
                [name, *(int(v) for v in (case.abnormal, case.opacity, case.pneumothorax))]
            )
    print(f"wrote {len(cases)} films and {LABELS_CSV} to {args.out}")
    return 0


def build_command(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        bundle = build_ruleout(args.config, args.out)
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    except ExportMismatch as error:
        print(f"cadnode-train build: export check FAILED: {error}", file=sys.stderr)
        return 1
    summarise(bundle, time.monotonic() - started)
    return 0


def build_ruleout(config_path: Path, out: Path) -> Bundle:
    """Train on phantoms, export, check ONNX against PyTorch, calibrate, write the bundle.

    Calibration and test metrics use ONNX Runtime scores of the exported file: the
    thresholds are set on exactly the numbers the daemon will compare them with.
    """
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
    train(model, *data["train"], config.training, config.seed)
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
        rebuild = shlex.join(
            ["cadnode-train", "build", "ruleout", "--config", str(config_path), "--out", str(out)]
        )
        write_bundle(
            folder,
            config=config,
            cases=cases,
            evaluation=evaluation,
            export_difference=difference,
            rebuild=rebuild,
        )
    return Bundle(out)


def summarise(bundle: Bundle, seconds: float) -> None:
    manifest = bundle.manifest
    print(f"{manifest.name} {manifest.version} -> {bundle.folder} in {seconds:.1f} s")
    print(f"  model.onnx sha256 {bundle.sha256}")
    for name, point in manifest.operating_points.items():
        print(
            f"  {name}: threshold {point.threshold:.6f} (validation sensitivity "
            f"{point.sensitivity:.4f}, specificity {point.specificity:.4f})"
        )
    for name, value in manifest.provenance.metrics.items():
        print(f"  {name}: {value:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
