"""`cadnode-train`: write phantom datasets, build engine bundles, evaluate detections.

cadnode-train phantoms --kind cxr|dbt --count 100 --out data/cxr [--positive-fraction 0.5]
    [--difficulty easy|default|hard]
cadnode-train froc --truth BOXES.csv --predictions PREDICTIONS.csv [--labels LABELS.csv]
cadnode-train detect --bundle engines/dbt-detector --out PREDICTIONS.csv
    [--file-paths BCS-DBT-file-paths.csv] [VOLUME.dcm...]
cadnode-train evaluate ruleout|segmenter|dbt [--bundle DIR] [--count N] [--seed S]
cadnode-train train ruleout --config training/configs/ruleout.yaml --out ruleout.pt
cadnode-train build ruleout --config training/configs/ruleout.yaml --out engines/cxr-ruleout
    [--checkpoint ruleout.pt]
cadnode-train build ruleout|segmenter|dbt --data DIR [--layout L] [--folds K --fold I]
    [--workers N] [--patience P] [--run-dir DIR] [--resume] --out DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from cadnode.core.yamlfile import ConfigError
from cadnode.infer.backends import plan_for_bundle
from cadnode.infer.bundle import Bundle
from cadnode.infer.phantoms.difficulty import PRESETS
from training.datasets import read_duke_boxes, read_duke_labels, read_duke_paths
from training.froc import MIN_DISTANCE_PX, froc, read_predictions, write_predictions
from training.phantom_sets import LABELS_CSV, write_chest_set, write_dbt_set
from training.records import LAYOUTS

# Commands that train, build or run a model import torch (the `train` extra) when they run,
# so `phantoms` and `froc` work on the daemon's own install.
CXR_SIZE, DBT_SIZE = 512, 128
ENGINES = {
    "ruleout": "cxr-ruleout",
    "segmenter": "cxr-segmenter",
    "dbt": "dbt-detector",
    "findings": "cxr-findings",
}
# The engines `evaluate` measures (training.evaluate.EVALUATORS, which imports torch: named
# here so parsing the command line needs none). The findings engine has no evaluator yet.
EVALUATED = ("dbt", "ruleout", "segmenter")


def needing_torch(module: str) -> ModuleType | None:
    """A training module that needs the `train` extra (torch, MONAI); None, said why, if
    that is not installed."""
    try:
        return importlib.import_module(f"training.{module}")
    except ModuleNotFoundError as error:
        print(
            f"cadnode-train: this command needs the `train` extra ({error.name} is not "
            "installed): run `make install-dev`",
            file=sys.stderr,
        )
        return None


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
    phantoms.add_argument(
        "--size", type=int, help=f"film or slice side, pixels (cxr {CXR_SIZE}, dbt {DBT_SIZE})"
    )
    phantoms.add_argument("--slices", type=int, default=16, help="slices per DBT volume")
    phantoms.add_argument(
        "--flip-right",
        action="store_true",
        help="store right DBT views turned 180 degrees: Duke's reader must flip them to fit",
    )
    phantoms.add_argument(
        "--difficulty",
        choices=sorted(PRESETS),
        default="easy",
        help="how faint, small and noisy the findings are, with look-alikes "
        "(cadnode.infer.phantoms.difficulty; the shipped engines train at `default`)",
    )
    phantoms.set_defaults(handler=write_phantoms)

    evaluation = commands.add_parser("froc", help="Duke BCS-DBT FROC of predictions (JSON)")
    evaluation.add_argument("--truth", type=Path, required=True, help="Duke box CSV")
    evaluation.add_argument("--predictions", type=Path, required=True)
    evaluation.add_argument("--labels", type=Path, help="Duke labels CSV: one row per volume")
    evaluation.add_argument("--volumes", type=int, help="number of volumes evaluated")
    evaluation.add_argument(
        "--min-distance", type=float, default=MIN_DISTANCE_PX, help="px (Duke: 100)"
    )
    evaluation.set_defaults(handler=froc_command)

    measure = commands.add_parser(
        "evaluate", help="measure a built bundle on fresh phantoms; JSON like its manifest"
    )
    measure.add_argument("engine", choices=EVALUATED)
    measure.add_argument("--bundle", type=Path, help="default engines/<engine name>")
    measure.add_argument("--count", type=int, default=100, help="films or volumes")
    measure.add_argument("--seed", type=int, default=990_000, help="first phantom seed")
    measure.set_defaults(handler=evaluate_command)

    detect = commands.add_parser(
        "detect", help="run a dbt-detector bundle over DBT files: Duke predictions CSV"
    )
    detect.add_argument("files", type=Path, nargs="*", help="Breast Tomosynthesis DICOM files")
    detect.add_argument(
        "--file-paths",
        type=Path,
        help="Duke file-path CSV: detect its volumes (below its folder), named and oriented by "
        "its View as the Duke boxes are",
    )
    detect.add_argument("--bundle", type=Path, default=Path("engines/dbt-detector"))
    detect.add_argument("--out", type=Path, required=True, help="predictions CSV to write")
    detect.add_argument(
        "--threshold", type=float, default=0.0, help="keep boxes scoring at least this"
    )
    detect.set_defaults(handler=detect_command)

    fit = commands.add_parser("train", help="train an engine's model; save its weights")
    fit.add_argument("engine", choices=sorted(ENGINES))
    fit.add_argument("--config", type=Path, help="default training/configs/ENGINE.yaml")
    fit.add_argument("--out", type=Path, required=True, help="checkpoint file to write (.pt)")
    add_data_options(fit)
    fit.set_defaults(handler=train_command)

    build = commands.add_parser("build", help="train, calibrate, export and bundle an engine")
    build.add_argument("engine", choices=sorted(ENGINES))
    build.add_argument("--config", type=Path, help="default training/configs/ENGINE.yaml")
    build.add_argument("--out", type=Path, help="default engines/<engine name>")
    build.add_argument(
        "--checkpoint", type=Path, help="weights from `cadnode-train train` (skips training)"
    )
    build.add_argument("--version", help="the bundle's version, instead of the config's")
    build.add_argument("--seed", type=int, help="the training seed, instead of the config's")
    add_data_options(build)
    build.set_defaults(handler=build_command)
    return top


def add_data_options(command: argparse.ArgumentParser) -> None:
    """Training from a dataset folder (training.records, training.streaming)."""
    data = command.add_argument_group("dataset folder (default: the config's phantom seeds)")
    data.add_argument("--data", type=Path, help="dataset folder in its published layout")
    data.add_argument("--layout", choices=LAYOUTS, help="default: guessed from the folder")
    data.add_argument("--labels", type=Path, help="the layout's labels CSV, if not its default")
    data.add_argument("--validation", type=float, default=0.15, help="share of patients")
    data.add_argument("--test", type=float, default=0.15, help="share of patients")
    data.add_argument("--folds", type=int, help="K-fold: test is fold --fold, validation the next")
    data.add_argument("--fold", type=int, default=0)
    data.add_argument("--workers", type=int, help="DataLoader worker processes (min(4, cores))")
    data.add_argument(
        "--patience", type=int, help="stop after this many epochs without a better validation AUC"
    )
    data.add_argument(
        "--run-dir", type=Path, help="checkpoint.pt, metrics.csv and tensorboard/ of the run"
    )
    data.add_argument("--resume", action="store_true", help="continue from --run-dir's checkpoint")


def data_source(args: argparse.Namespace) -> object:
    """The training.sources.Source the data options name (needs torch)."""
    from training.sources import Source
    from training.streaming import RunOptions, default_workers

    if args.resume and args.run_dir is None:
        raise ValueError("--resume needs --run-dir")
    if (args.workers is not None and args.workers < 0) or (args.folds or 2) < 2:
        raise ValueError("need --workers >= 0 and --folds >= 2")
    run = RunOptions(
        run_dir=args.run_dir,
        resume=args.resume,
        patience=args.patience,
        workers=default_workers() if args.workers is None else args.workers,
    )
    return Source(
        data=args.data,
        layout=args.layout,
        labels=args.labels,
        validation=args.validation,
        test=args.test,
        folds=args.folds,
        fold=args.fold,
        run=run,
    )


def write_phantoms(args: argparse.Namespace) -> int:
    """DICOM files plus their labels in the real datasets' formats (training.phantom_sets)."""
    if args.count <= 0 or not 0 <= args.positive_fraction <= 1:
        print(
            "cadnode-train phantoms: need --count > 0, 0 <= --positive-fraction <= 1",
            file=sys.stderr,
        )
        return 2
    common = {
        "count": args.count,
        "first_seed": args.seed,
        "positive_fraction": args.positive_fraction,
        "difficulty": PRESETS[args.difficulty],
    }
    if args.kind == "dbt":
        size = args.size or DBT_SIZE
        written = write_dbt_set(
            args.out, slices=args.slices, size=size, flip_right=args.flip_right, **common
        )
        print(f"wrote {written} DBT volumes and the Duke BCS-DBT CSVs to {args.out}")
    else:
        written = write_chest_set(args.out, size=args.size or CXR_SIZE, **common)
        print(f"wrote {written} films, {LABELS_CSV} and RSNA/SIIM/Montgomery labels to {args.out}")
    return 0


def froc_command(args: argparse.Namespace) -> int:
    """Duke BCS-DBT FROC: JSON sensitivities at 0.25..4 FP per volume, lesion and breast."""
    try:
        boxes = read_duke_boxes(args.truth)
        predictions = read_predictions(args.predictions)
        volumes = len(read_duke_labels(args.labels)) if args.labels else args.volumes
        result = froc(boxes, predictions, volumes=volumes, min_distance=args.min_distance)
    except (OSError, ValueError, KeyError) as error:
        print(f"cadnode-train froc: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary(), indent=2))
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """Fresh-phantom figures next to what the bundle's manifest claims."""
    if (evaluation := needing_torch("evaluate")) is None:
        return 2
    try:
        bundle = Bundle(args.bundle or Path("engines") / ENGINES[args.engine])
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    measured = evaluation.EVALUATORS[args.engine](bundle, range(args.seed, args.seed + args.count))
    claimed = bundle.manifest.provenance.metrics
    report = {
        name: {"measured": round(value, 6), "manifest": claimed.get(name)}
        for name, value in measured.items()
    }
    print(json.dumps(report, indent=2))
    return 0


def detect_command(args: argparse.Namespace) -> int:
    """Predictions in the Duke format (PatientID, StudyUID, View, X, Y, Z, Width, Height,
    Depth, Score), ready for `cadnode-train froc`."""
    if (detector := needing_torch("detector")) is None:
        return 2
    try:
        keys = duke_names(args.file_paths)
        files = [*args.files, *keys]
        if not files:
            raise ValueError("name DBT files or a Duke --file-paths CSV")
        bundle = Bundle(args.bundle)
        predictions = detector.detect_files(bundle, files, keys=keys)
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as error:
        print(f"cadnode-train detect: {error}", file=sys.stderr)
        return 2
    kept = [p for p in predictions if p.score >= args.threshold]
    write_predictions(args.out, kept)
    print(f"wrote {len(kept)} predictions for {len(files)} volume(s) to {args.out}")
    return 0


def duke_names(file_paths: Path | None) -> dict[Path, tuple[str, str, str]]:
    """File -> (PatientID, StudyUID, View) from a Duke file-path CSV, files below its folder."""
    if file_paths is None:
        return {}
    volumes = read_duke_paths(file_paths, file_paths.parent)
    return {path: key for key, path in volumes.items()}


def train_command(args: argparse.Namespace) -> int:
    """Only the training step: the weights go to a checkpoint for `build --checkpoint`."""
    started = time.monotonic()
    config = args.config or Path(f"training/configs/{args.engine}.yaml")
    if (builds := needing_torch("builds")) is None:
        return 2
    try:
        model = builds.TRAINERS[args.engine](config, None, data_source(args))[-1]
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"cadnode-train train: {error}", file=sys.stderr)
        return 2
    builds.save_checkpoint(model, args.out, engine=args.engine, config_path=config)
    print(f"{args.engine}: trained in {time.monotonic() - started:.1f} s -> {args.out}")
    return 0


def build_command(args: argparse.Namespace) -> int:
    started = time.monotonic()
    config = args.config or Path(f"training/configs/{args.engine}.yaml")
    out = args.out or Path("engines") / ENGINES[args.engine]
    if (builds := needing_torch("builds")) is None:
        return 2
    try:
        source = builds.resolved(data_source(args), args.engine)
        asked = (("version", args.version), ("seed", args.seed))
        changes = {key: value for key, value in asked if value is not None}
        rebuild = shlex.join(
            [
                *("cadnode-train", "build", args.engine, "--config", str(config)),
                *("--out", str(out), *source.arguments()),
                *(item for key, value in changes.items() for item in (f"--{key}", str(value))),
            ]
        )
        with builds.config_with(config, **changes) as chosen:
            bundle = builds.BUILDERS[args.engine](chosen, out, rebuild, args.checkpoint, source)
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"cadnode-train build: {error}", file=sys.stderr)
        return 2
    except builds.ExportMismatch as error:
        print(f"cadnode-train build: export check FAILED: {error}", file=sys.stderr)
        return 1
    summarise(bundle, time.monotonic() - started)
    # The plan is for this GPU and TensorRT version only; a node with another builds its own.
    print(f"  {plan_for_bundle(bundle)}")
    return 0


def summarise(bundle: Bundle, seconds: float) -> None:
    manifest = bundle.manifest
    print(f"{manifest.name} {manifest.version} -> {bundle.folder} in {seconds:.1f} s")
    print(f"  model.onnx sha256 {bundle.sha256}")
    for name, point in manifest.operating_points.items():
        measured = (
            f" (validation sensitivity {point.sensitivity:.4f}, specificity "
            f"{point.specificity:.4f})"
            if point.sensitivity is not None and point.specificity is not None
            else ""
        )
        print(f"  {name}: threshold {point.threshold:.6f}{measured}")
    for name, value in manifest.provenance.metrics.items():
        print(f"  {name}: {value:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
