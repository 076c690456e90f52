"""Write an engine bundle: manifest.yaml, model.onnx, MODEL_CARD.md and its plots.

The parts every engine shares live here (staging, manifest writing, the model card's frame:
intended use, export check, rebuild); each engine module supplies its manifest and the
card's middle sections. The rule-out engine's manifest and card are at the end.

The bundle is assembled in a hidden folder beside its destination and moved into place only
once `cadnode.infer.bundle.Bundle` has loaded and verified it, so `engines/` never holds a
half-written engine (the daemon refuses to start with a faulty bundle). The same config and
the same sources give the same bytes: the date is the source commit's (`source_date`), not the
day of the build.
"""

from __future__ import annotations

import datetime as dt
import io
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydantic import BaseModel
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation
from ruamel.yaml import YAML

from cadnode.infer.bundle import (
    MANIFEST,
    Bundle,
    Code,
    Inputs,
    Label,
    Manifest,
    ModelFile,
    OperatingPoint,
    Population,
    Preprocessing,
    Provenance,
    TaskKind,
    sha256_of,
)
from cadnode.infer.phantoms.difficulty import Difficulty
from training.export import INPUT, OUTPUT, TOLERANCE
from training.plots import draw_calibration, draw_roc
from training.ruleout import Evaluation, Labelled, RuleoutConfig, class_prior

MODEL_FILE, CARD_FILE, ROC_FILE = "model.onnx", "MODEL_CARD.md", "roc.png"
FROC_FILE, CALIBRATION_FILE = "froc.png", "calibration.png"
INTENDED_USE = "Demonstration only: trained on synthetic phantoms, not for clinical use."
PHANTOM_CAVEAT = (
    "The phantoms are far simpler than real images (no devices, no positioning or exposure "
    "variation, findings drawn from one generator), so the figures below say the pipeline "
    "works, not that the model would detect disease in patients."
)
SYNTHETIC_FIGURES = (
    "These figures are measured on synthetic phantoms, not on patients' images: they say how "
    "the engine does on the generator's findings at the difficulty above, nothing about "
    "clinical performance."
)


def difficulty_sentence(difficulty: Difficulty) -> str:
    """The card's and provenance's account of how hard the phantoms' findings were."""
    return (
        f"Phantom difficulty {difficulty.describe()}, as cadnode.infer.phantoms.difficulty "
        "sets it: each lesion's contrast drawn from that share of the original look's, lesion "
        "size and noise scaled, and normal structures that look like lesions added at that "
        "mean count per image."
    )


# Recorded in provenance.metrics: the training data's abnormal share before any sampling.
PRIOR_METRIC = "train_prior_abnormal"
ABNORMAL = Code(value="263654008", scheme="SCT", meaning="Abnormal")
# What the chest engines (rule-out filter, segmenter) accept: frontal CR/DX chest films.
CHEST_FILMS = Inputs(
    modalities=["CR", "DX"],
    sop_classes=[ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation],
    body_parts=["CHEST"],
    views=["PA", "AP"],
)
REPOSITORY = Path(__file__).resolve().parent.parent


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out`; on success it replaces `out`, on failure it vanishes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    retired = staging.with_name(staging.name + "-old")
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a bundle is for others to read
        if out.exists():
            out.rename(retired)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


# What a bundle is built from: a change here that is not committed is not in the revision.
SOURCES = ("training", "cadnode", "pyproject.toml")
DIRTY = "-dirty"


def code_revision(repository: Path = REPOSITORY) -> str:
    """The commit the engine was built from: HEAD, marked `-dirty` when `git status` shows
    uncommitted or untracked files under SOURCES (that commit alone would not rebuild it),
    "unknown" outside a git checkout."""
    head = _git(repository, "rev-parse", "HEAD")
    if not head:
        return "unknown"
    changes = _git(repository, "status", "--porcelain", "--untracked-files=all", "--", *SOURCES)
    return head + DIRTY if changes is None or changes else head


def source_date(repository: Path = REPOSITORY) -> str:
    """The bundle's date: its source commit's committer date (`git log -1 --format=%cs`), so a
    rebuild from that commit writes the same manifest; today's outside a git checkout."""
    return _git(repository, "log", "-1", "--format=%cs") or dt.date.today().isoformat()


def _git(repository: Path, *arguments: str) -> str | None:
    """A git command's output, stripped; None when git is missing or the command fails."""
    try:
        result = subprocess.run(
            ["git", *arguments],
            cwd=repository,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def write_bundle(folder: Path, manifest: Manifest, card: str) -> Bundle:
    """Write manifest and card next to `folder/model.onnx` (and its plots); return it verified."""
    write_manifest(folder / MANIFEST, manifest)
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    return Bundle(folder)


def compose_card(
    manifest: Manifest,
    sections: Sequence[str],
    *,
    export_difference: float,
    rebuild: str,
    config: BaseModel,
    tolerance: float = TOLERANCE,
) -> str:
    """The card: title and intended use, the engine's `sections`, export check, rebuild."""
    head = [
        f"# {manifest.name} {manifest.version} — model card",
        f"**{INTENDED_USE}** It shows the cadnode pipeline end to end with real weights; a "
        "site replaces this bundle with one trained on its own data.",
    ]
    tail = [
        "## Export check\n\nONNX Runtime was run on a batch of test inputs and compared with "
        f"PyTorch: max |difference| {export_difference:.2e} (relative to the value where it "
        f"exceeds 1), tolerance {tolerance:g} (the build fails above it).",
        "## Rebuild\n\n```\n" + rebuild + "\n```\n\nSame config, same bytes of `model.onnx` "
        f"(sha256 `{manifest.model.sha256}`). Built from code revision "
        f"`{manifest.provenance.code_revision}`, dated {manifest.provenance.date} (the "
        "commit's date, not the build's: a rebuild from it writes the same manifest)"
        + revision_caveat(manifest.provenance.code_revision)
        + ". Config:\n\n"
        "```yaml\n" + _yaml_text(config.model_dump(mode="json", exclude={"date"})) + "```",
    ]
    return "\n\n".join([*head, *sections, *tail]) + "\n"


def revision_caveat(revision: str) -> str:
    """What the card adds after a revision that does not pin the code."""
    if revision.endswith(DIRTY):
        return (
            " (`-dirty`: the sources under " + ", ".join(SOURCES) + " had uncommitted changes, "
            "so that commit alone does not rebuild this bundle)"
        )
    return " (not built from a git checkout)" if revision == "unknown" else ""


def provenance(
    training_data: str,
    date: str | None,
    metrics: Mapping[str, float],
    confidence_intervals: Mapping[str, tuple[float, float]] | None = None,
) -> Provenance:
    """Provenance with figures rounded for reading (6 decimals)."""
    return Provenance(
        training_data=training_data,
        intended_use=INTENDED_USE,
        date=date or source_date(),
        code_revision=code_revision(),
        metrics={name: round(value, 6) for name, value in metrics.items()},
        confidence_intervals={
            name: (round(low, 6), round(high, 6))
            for name, (low, high) in (confidence_intervals or {}).items()
        },
    )


def write_ruleout_bundle(
    folder: Path,
    *,
    config: RuleoutConfig,
    cases: Mapping[str, Sequence[Labelled]],
    evaluation: Evaluation,
    export_difference: float,
    rebuild: str,
    description: str | None = None,
    population: Population | None = None,
) -> Bundle:
    """The cxr-ruleout bundle: manifest, card, ROC and calibration plots beside model.onnx.
    `description`: the training data's, for data other than the config's phantoms;
    `population`: the training population, for the node's drift checks."""
    manifest = make_manifest(
        config, cases, evaluation, sha256_of(folder / MODEL_FILE), description
    ).model_copy(update={"population": population})
    points = [
        (name, 1 - point.specificity, point.sensitivity)
        for name, point in evaluation.test_points.items()
    ]
    draw_roc(folder / ROC_FILE, *evaluation.test_roc, evaluation.test_auc, points)
    draw_calibration(
        folder / CALIBRATION_FILE,
        [("P(abnormal)", evaluation.test_calibration)],
        "Held-out test calibration",
    )
    card = model_card(
        manifest, config, evaluation, export_difference, rebuild, phantoms=description is None
    )
    return write_bundle(folder, manifest, card)


def make_manifest(
    config: RuleoutConfig,
    cases: Mapping[str, Sequence[Labelled]],
    evaluation: Evaluation,
    sha256: str,
    description: str | None = None,
) -> Manifest:
    calibration = config.calibration
    meanings = {
        "rule_out": "Below this probability the film is reported as 'no abnormality detected'. "
        f"Of the thresholds with sensitivity >= {calibration.rule_out_sensitivity} on the "
        "validation phantoms, the lowest with the best specificity.",
        "urgent": "At or above this probability the film is flagged for priority reading. "
        f"Lowest threshold with specificity >= {calibration.urgent_specificity} on the "
        "validation phantoms, never below rule_out.",
    }
    return Manifest(
        name=config.name,
        version=config.version,
        task=TaskKind.classify,
        description="Chest radiograph normal-vs-abnormal classifier (abnormal: lung opacity "
        "and/or pneumothorax) that rules out normal films. Output: P(abnormal).",
        inputs=CHEST_FILMS,
        preprocessing=Preprocessing(size=config.input_size),
        labels=[Label(name="abnormal", code=ABNORMAL)],
        operating_points=calibrated_points(evaluation, meanings),
        model=ModelFile(file=MODEL_FILE, sha256=sha256, input=INPUT, output=OUTPUT),
        provenance=provenance(
            description or describe_data(config, cases),
            config.date,
            {**evaluation.metrics(), PRIOR_METRIC: training_prior(cases)},
            evaluation.test_ci,
        ),
    )


def training_prior(cases: Mapping[str, Sequence[Labelled]]) -> float:
    """The abnormal prior of the training films before sampling (seed 003 A.2's p(i)): what
    a site divides by to prior-threshold P(abnormal) (training.ruleout.prior_thresholded)."""
    return class_prior(np.array([case.abnormal for case in cases["train"]]))


def calibrated_points(
    evaluation: Evaluation, meanings: Mapping[str, str]
) -> dict[str, OperatingPoint]:
    """The manifest's operating points from a calibration on validation (the rule-out
    engine's, and the findings engine's on P(abnormal)), each with its meaning."""
    return {
        name: OperatingPoint(
            threshold=point.threshold,
            description=meanings[name],
            sensitivity=round(point.sensitivity, 6),
            specificity=round(point.specificity, 6),
            sensitivity_ci=rounded(evaluation.validation_ci[name][0]),
            specificity_ci=rounded(evaluation.validation_ci[name][1]),
        )
        for name, point in evaluation.operating_points.items()
    }


def rounded(bounds: tuple[float, float]) -> tuple[float, float]:
    return round(bounds[0], 6), round(bounds[1], 6)


def interval(bounds: tuple[float, float]) -> str:
    """A confidence interval as the cards print it: [low, high]."""
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def describe_data(config: RuleoutConfig, cases: Mapping[str, Sequence[Labelled]]) -> str:
    """Counts, seeds and findings of every split, in one sentence per split."""
    parts = []
    for name, split in config.splits.named().items():
        counts = Counter(case.finding for case in cases[name])
        findings = ", ".join(f"{counts[key]} {key}" for key in sorted(counts))
        parts.append(
            f"{name}: {split.count} films, seeds {split.seeds.start}-{split.seeds.stop - 1} "
            f"({findings})."
        )
    return (
        "Synthetic chest radiograph phantoms (cadnode/infer/phantoms/chest.py, "
        f"{config.phantom_size}x{config.phantom_size} px DX, MONOCHROME2), preprocessed by "
        f"cadnode.infer.preprocess.image_to_tensor to {config.input_size} px. Abnormal = opacity "
        "and/or pneumothorax. " + " ".join(parts) + " " + difficulty_sentence(config.difficulty)
    )


def write_manifest(path: Path, manifest: Manifest) -> None:
    header = "# Written by cadnode-train; model.sha256 pins model.onnx. Rebuild, don't edit.\n"
    path.write_text(header + _yaml_text(manifest.model_dump(mode="json")), encoding="utf-8")


def _yaml_text(data: object) -> str:
    """Block-style YAML, one line per value (no folded descriptions), keys in model order."""
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.width = 4096
    stream = io.StringIO()
    yaml.dump(data, stream)
    return stream.getvalue()


def model_card(
    manifest: Manifest,
    config: RuleoutConfig,
    evaluation: Evaluation,
    export_difference: float,
    rebuild: str,
    *,
    phantoms: bool = True,
) -> str:
    """An honest account: synthetic data, what the figures mean, how to rebuild."""
    points = "\n".join(
        f"| `{name}` | {point.threshold:.6f} | {point.sensitivity:.4f} "
        f"{interval(evaluation.validation_ci[name][0])} | {point.specificity:.4f} "
        f"{interval(evaluation.validation_ci[name][1])} | "
        f"{evaluation.test_points[name].sensitivity:.4f} "
        f"{interval(evaluation.test_ci[f'test_sensitivity_at_{name}'])} | "
        f"{evaluation.test_points[name].specificity:.4f} "
        f"{interval(evaluation.test_ci[f'test_specificity_at_{name}'])} |"
        for name, point in evaluation.operating_points.items()
    )
    ci_text = (
        f"saturated: every abnormal test film scored above every normal one, so a bootstrap "
        f"only ever sees 1.0; 95 % interval {interval(evaluation.test_ci['test_auc'])}, its lower "
        "bound distribution-free from the counts of abnormal and normal films"
        if evaluation.test_auc_saturated
        else f"95 % bootstrap interval {interval(evaluation.test_ci['test_auc'])}"
    )
    by_finding = "\n".join(
        f"| {finding} | {value:.4f} |"
        for finding, value in evaluation.test_sensitivity_by_finding.items()
    )
    sections = [
        "## What it does\n\n" + manifest.description + " Inputs: CR/DX chest films, PA or AP, "
        "preprocessed by `cadnode.infer.preprocess.image_to_tensor` to "
        f"{config.input_size} px (the "
        "same function the daemon uses). The ONNX graph takes `image` (N, 1, "
        f"{config.input_size}, {config.input_size}) and returns `probability` (N,).",
        "## Data\n\n" + manifest.provenance.training_data + "\n\n" + PHANTOM_CAVEAT,
        "## Model and training\n\nA small CNN (conv-BN-ReLU-maxpool blocks of widths "
        f"{config.model.channels}, global average and max pooling, one linear logit), AdamW "
        "with a one-cycle schedule, binary cross-entropy. Every batch holds a fixed share of "
        f"abnormal films ({config.training.batch_positive_fraction}; batch control, seed 000 "
        f"Chang & Huang); the training films' own abnormal share before that sampling, "
        f"{manifest.provenance.metrics[PRIOR_METRIC]:.4f}, is recorded as `{PRIOR_METRIC}`: "
        "seed 003 A.2's prior thresholding divides by it. Deterministic: fixed seeds, "
        "`torch.use_deterministic_algorithms`, "
        f"{config.threads} threads.",
        "## Operating points\n\nChosen on the validation phantoms, then applied unchanged to "
        "the held-out test phantoms. A film is called abnormal when P >= threshold. In "
        "brackets: 95 % Clopper-Pearson exact binomial intervals from the counts of each "
        "split (a bootstrap collapses to [1, 1] when every film is called right).\n\n"
        "| point | threshold | val. sensitivity | val. specificity | test sensitivity "
        "| test specificity |\n|---|---|---|---|---|---|\n"
        + points
        + "\n\n"
        + "\n".join(f"- `{k}`: {v.description}" for k, v in manifest.operating_points.items())
        + "\n\n`rule_out` never gives away sensitivity that buys no specificity: it keeps "
        "every abnormal validation film it can without ruling in more normal ones. The "
        "thresholds fit these phantoms only: recalibrate on a site's own validation set.",
        "## Held-out test metrics\n\n"
        + (SYNTHETIC_FIGURES + "\n\n" if phantoms else "")
        + f"AUC {evaluation.test_auc:.4f} ({ci_text}) on the test "
        f"phantoms (validation AUC {evaluation.validation_auc:.4f}). Computed with ONNX Runtime "
        "on the shipped `model.onnx`. Sensitivity at `rule_out` by finding:\n\n"
        "| finding | sensitivity |\n|---|---|\n"
        + by_finding
        + f"\n\n![ROC of the held-out test set]({ROC_FILE})\n\n"
        f"![Calibration of P(abnormal) on the held-out test set]({CALIBRATION_FILE})",
    ]
    return compose_card(
        manifest, sections, export_difference=export_difference, rebuild=rebuild, config=config
    )
