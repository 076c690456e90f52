"""Write an engine bundle: manifest.yaml, model.onnx, MODEL_CARD.md and roc.png.

The bundle is assembled in a hidden folder beside its destination and moved into place only
once `cadnode.infer.bundle.Bundle` has loaded and verified it, so `engines/` never holds a
half-written engine (the daemon refuses to start with a faulty bundle). Apart from the date
and the code revision, the same config gives the same bytes.
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

from PIL import Image, ImageDraw
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
    Preprocessing,
    Provenance,
    TaskKind,
    sha256_of,
)
from training.export import INPUT, OUTPUT, TOLERANCE
from training.ruleout import Case, Evaluation, RuleoutConfig

MODEL_FILE, CARD_FILE, ROC_FILE = "model.onnx", "MODEL_CARD.md", "roc.png"
INTENDED_USE = "Demonstration only: trained on synthetic phantoms, not for clinical use."
ABNORMAL = Code(value="263654008", scheme="SCT", meaning="Abnormal")
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


def code_revision() -> str:
    """The commit the engine was built from, or "unknown" outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    revision = result.stdout.strip()
    return revision if result.returncode == 0 and revision else "unknown"


def write_bundle(
    folder: Path,
    *,
    config: RuleoutConfig,
    cases: Mapping[str, Sequence[Case]],
    evaluation: Evaluation,
    export_difference: float,
    rebuild: str,
) -> Bundle:
    """Write manifest, card and ROC plot next to `folder/model.onnx`; return it verified."""
    manifest = make_manifest(config, cases, evaluation, sha256_of(folder / MODEL_FILE))
    write_manifest(folder / MANIFEST, manifest)
    draw_roc(folder / ROC_FILE, evaluation)
    card = model_card(manifest, config, evaluation, export_difference, rebuild)
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    return Bundle(folder)


def make_manifest(
    config: RuleoutConfig, cases: Mapping[str, Sequence[Case]], evaluation: Evaluation, sha256: str
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
        inputs=Inputs(
            modalities=["CR", "DX"],
            sop_classes=[ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation],
            body_parts=["CHEST"],
            views=["PA", "AP"],
        ),
        preprocessing=Preprocessing(size=config.input_size),
        labels=[Label(name="abnormal", code=ABNORMAL)],
        operating_points={
            name: OperatingPoint(
                threshold=point.threshold,
                description=meanings[name],
                sensitivity=round(point.sensitivity, 6),
                specificity=round(point.specificity, 6),
            )
            for name, point in evaluation.operating_points.items()
        },
        model=ModelFile(file=MODEL_FILE, sha256=sha256, input=INPUT, output=OUTPUT),
        provenance=Provenance(
            training_data=describe_data(config, cases),
            intended_use=INTENDED_USE,
            date=config.date or dt.date.today().isoformat(),
            code_revision=code_revision(),
            metrics=evaluation.metrics(),
        ),
    )


def describe_data(config: RuleoutConfig, cases: Mapping[str, Sequence[Case]]) -> str:
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
        "Synthetic chest radiograph phantoms (training/phantoms.py, "
        f"{config.phantom_size}x{config.phantom_size} px DX, MONOCHROME2), preprocessed by "
        f"cadnode.preprocess.image_to_tensor to {config.input_size} px. Abnormal = opacity "
        "and/or pneumothorax. " + " ".join(parts)
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


def draw_roc(path: Path, evaluation: Evaluation, side: int = 360, margin: int = 40) -> None:
    """ROC curve of the held-out test set with both operating points marked."""
    image = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(image)
    span = side - 2 * margin

    def at(fpr: float, tpr: float) -> tuple[float, float]:
        return margin + fpr * span, side - margin - tpr * span

    draw.rectangle([at(0, 1), at(1, 0)], outline="black")
    draw.line([at(0, 0), at(1, 1)], fill="lightgray")
    fpr, tpr = evaluation.test_roc
    steps = sorted(zip(fpr.tolist(), tpr.tolist(), strict=True))
    curve = [at(0, 0), *(at(f, t) for f, t in steps), at(1, 1)]
    draw.line(curve, fill="navy", width=2)
    for row, (name, point) in enumerate(evaluation.test_points.items()):
        colour = ("green", "red")[row % 2]
        x, y = at(1 - point.specificity, point.sensitivity)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline=colour, width=2)
        draw.text((x + 6, y + 2 + 12 * row), name, fill=colour)  # rows: points may coincide
    draw.text((margin, 10), f"Held-out test ROC, AUC {evaluation.test_auc:.4f}", fill="black")
    draw.text((margin, side - margin + 8), "1 - specificity", fill="black")
    draw.text((4, margin - 16), "sensitivity", fill="black")
    image.save(path, optimize=False)


def model_card(
    manifest: Manifest,
    config: RuleoutConfig,
    evaluation: Evaluation,
    export_difference: float,
    rebuild: str,
) -> str:
    """An honest account: synthetic data, what the figures mean, how to rebuild."""
    points = "\n".join(
        f"| `{name}` | {point.threshold:.6f} | {point.sensitivity:.4f} | "
        f"{point.specificity:.4f} | {evaluation.test_points[name].sensitivity:.4f} | "
        f"{evaluation.test_points[name].specificity:.4f} |"
        for name, point in evaluation.operating_points.items()
    )
    by_finding = "\n".join(
        f"| {finding} | {value:.4f} |"
        for finding, value in evaluation.test_sensitivity_by_finding.items()
    )
    sections = [
        f"# {manifest.name} {manifest.version} — model card",
        f"**{INTENDED_USE}** It shows the cadnode pipeline end to end with real weights; a "
        "site replaces this bundle with one trained on its own data.",
        "## What it does\n\n" + manifest.description + " Inputs: CR/DX chest films, PA or AP, "
        f"preprocessed by `cadnode.preprocess.image_to_tensor` to {config.input_size} px (the "
        "same function the daemon uses). The ONNX graph takes `image` (N, 1, "
        f"{config.input_size}, {config.input_size}) and returns `probability` (N,).",
        "## Data\n\n" + manifest.provenance.training_data + "\n\nThe phantoms are far simpler "
        "than real radiographs (no devices, no positioning or exposure variation, findings "
        "drawn from one generator), so the figures below say the pipeline works, not that the "
        "model would detect disease in patients.",
        "## Model and training\n\nA small CNN (conv-BN-ReLU-maxpool blocks of widths "
        f"{config.model.channels}, global average and max pooling, one linear logit), AdamW "
        "with a one-cycle schedule, binary cross-entropy. Every batch holds a fixed share of "
        f"abnormal films ({config.training.batch_positive_fraction}; batch control, seed 000 "
        "Chang & Huang). Deterministic: fixed seeds, `torch.use_deterministic_algorithms`, "
        f"{config.threads} threads.",
        "## Operating points\n\nChosen on the validation phantoms, then applied unchanged to "
        "the held-out test phantoms. A film is called abnormal when P >= threshold.\n\n"
        "| point | threshold | val. sensitivity | val. specificity | test sensitivity "
        "| test specificity |\n|---|---|---|---|---|---|\n"
        + points
        + "\n\n"
        + "\n".join(f"- `{k}`: {v.description}" for k, v in manifest.operating_points.items())
        + "\n\n`rule_out` never gives away sensitivity that buys no specificity: it keeps "
        "every abnormal validation film it can without ruling in more normal ones. The "
        "phantoms separate almost perfectly; real data will not, so recalibrate on a site's "
        "own validation set.",
        "## Held-out test metrics\n\n"
        f"AUC {evaluation.test_auc:.4f} on the test phantoms (validation AUC "
        f"{evaluation.validation_auc:.4f}). Computed with ONNX Runtime on the shipped "
        "`model.onnx`. Sensitivity at `rule_out` by finding:\n\n| finding | sensitivity |\n"
        "|---|---|\n" + by_finding + f"\n\n![ROC of the held-out test set]({ROC_FILE})",
        "## Export check\n\nONNX Runtime was run on a batch of test films and compared with "
        f"PyTorch: max |difference| {export_difference:.2e}, tolerance {TOLERANCE:g} (the "
        "build fails above it).",
        "## Rebuild\n\n```\n" + rebuild + "\n```\n\nSame config, same bytes of `model.onnx` "
        f"(sha256 `{manifest.model.sha256}`). Built from code revision "
        f"`{manifest.provenance.code_revision}` on {manifest.provenance.date}. Config:\n\n"
        "```yaml\n" + _yaml_text(config.model_dump(mode="json", exclude={"date"})) + "```",
    ]
    return "\n\n".join(sections) + "\n"
