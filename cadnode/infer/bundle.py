"""Engine bundles: a folder with `manifest.yaml` and the model files it lists.

The manifest says what the engine is (task kind, accepted inputs, preprocessing, labels
with codes, operating points, provenance) and pins every model file by SHA-256, which is
checked on load: a tampered or half-copied bundle is refused, never run.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cadnode.core.yamlfile import ConfigError, load_model

MANIFEST = "manifest.yaml"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskKind(StrEnum):
    classify = "classify"
    segment = "segment"
    detect = "detect"


class Code(Strict):
    """A coded concept, e.g. SNOMED CT 263654008 'Abnormal'."""

    value: str
    scheme: str
    meaning: str


class Inputs(Strict):
    modalities: list[str]
    sop_classes: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    views: list[str] = Field(default_factory=list)


class Preprocessing(Strict):
    size: int = Field(
        gt=0, description="Square model input side, pixels (cadnode.infer.preprocess)"
    )


class Label(Strict):
    name: str
    code: Code
    # The kind of thing the code names (DICOM CID 7150, e.g. SCT 91723000 "Anatomical
    # Structure"): what a SEG segment's Segmented Property Category needs.
    category: Code | None = None


class OperatingPoint(Strict):
    threshold: float = Field(ge=0, le=1)
    description: str
    sensitivity: float | None = None
    specificity: float | None = None
    # Percentile bootstrap intervals (low, high) of the figures above, on the same cases.
    sensitivity_ci: tuple[float, float] | None = None
    specificity_ci: tuple[float, float] | None = None


class ModelFile(Strict):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input: str = "image"
    output: str = "probability"


class Output(Strict):
    """What the model's output holds, where it is more than one probability per image.

    segment: `shape` [batch, label, row, column], one probability map per label (in `labels`
    order) at the model resolution; detect: [batch, box, field] with `fields` naming the
    last axis (e.g. score, x, y, width, height in model-input pixels).
    """

    shape: list[str]
    fields: list[str] = Field(default_factory=list)
    description: str
    # Settings the output is read with (e.g. a detector's fusion IoU), by name.
    parameters: dict[str, float] = Field(default_factory=dict)


class Prefilter(Strict):
    """Seed 002's two-class rule on a multi-label classifier's P(healthy): above `alpha`
    only the healthy label is reported (every finding suppressed), above `beta` it is
    reported beside the findings, below `beta` the findings alone."""

    alpha: float = Field(ge=0, le=1)
    beta: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _beta_first(self) -> Prefilter:
        if self.beta > self.alpha:
            raise ValueError(f"prefilter: beta {self.beta} is above alpha {self.alpha}")
        return self


# The operating point of a multi-label finding that decides whether it is reported.
REPORT_POINT = "report"


class Findings(Strict):
    """A classifier's second output: one probability per label (a multi-label engine, seed
    004). The declared output stays the first label's probability (e.g. abnormal, against
    the rule-out point); `output` names the model output shaped (batch, labels), one
    probability per label of `labels` in order, the first included.

    Every label but the first and `healthy` is a finding with its own operating points: the
    one named `report` decides whether it is reported, others (e.g. `urgent`) are there for
    conditions. `healthy` names the label whose probability is P(no finding), which seed
    002's `prefilter` reads. A finding in `not_reported` has no `report` point (validation
    could not set one): its probability is kept, it is never reported.
    """

    output: str = Field(min_length=1)
    healthy: str | None = None
    prefilter: Prefilter | None = None
    operating_points: dict[str, dict[str, OperatingPoint]]
    not_reported: list[str] = Field(default_factory=list)


def findings_problems(manifest: Manifest) -> list[str]:
    """What keeps a manifest's `findings` from fitting its labels and model (none: [])."""
    findings = manifest.findings
    if findings is None:
        return []
    names = [label.name for label in manifest.labels]
    problems = []
    if manifest.task is not TaskKind.classify:
        problems.append(f"findings: only a classify engine has them, not {manifest.task.value}")
    if findings.output == manifest.model.output:
        problems.append(f"findings.output {findings.output!r} is the declared model.output")
    if len(set(names)) != len(names):
        problems.append("labels: a multi-label engine's label names must be unique")
    if findings.healthy is not None and findings.healthy not in names[1:]:
        problems.append(f"findings.healthy {findings.healthy!r} is not one of labels[1:]")
    if findings.prefilter is not None and findings.healthy is None:
        problems.append("findings.prefilter needs findings.healthy (the P(healthy) label)")
    wanted = finding_labels(manifest)
    for name in sorted(set(findings.operating_points) - set(wanted)):
        problems.append(f"findings.operating_points: {name!r} is not a finding label")
    for name in sorted(set(findings.not_reported) - set(wanted)):
        problems.append(f"findings.not_reported: {name!r} is not a finding label")
    for name in wanted:
        has_report = REPORT_POINT in findings.operating_points.get(name, {})
        if name in findings.not_reported and has_report:
            problems.append(f"findings.operating_points.{name}: not_reported, yet a report point")
        elif name not in findings.not_reported and not has_report:
            problems.append(f"findings.operating_points.{name}: no {REPORT_POINT!r} point")
    return problems


def finding_labels(manifest: Manifest) -> list[str]:
    """A multi-label engine's findings: every label but the first and the healthy one."""
    healthy = manifest.findings.healthy if manifest.findings else None
    return [label.name for label in manifest.labels[1:] if label.name != healthy]


class Population(Strict):
    """The training population, as drift (cadnode.watch.drift) compares a sender's images and
    the engine's answers with it: each input attribute's categories (cadnode.infer.profile
    names and bins them) with their shares, and the held-out answers' probabilities."""

    images: int = Field(ge=1, description="Training images the metadata shares are of")
    metadata: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="attribute -> {category: share}; absent: unknown"
    )
    answers: int = Field(ge=1, description="Held-out images the probabilities below are of")
    # Shares of the answers in 10 equal bins of [0, 1] (the last includes 1).
    probability_histogram: list[float] = Field(min_length=10, max_length=10)
    # The 0, 5, ..., 100th percentiles of the probabilities: their distribution for KS.
    probability_quantiles: list[float] = Field(min_length=21, max_length=21)
    positive_rate: float = Field(ge=0, le=1)


class Cascade(Strict):
    """An engine meant to run only on what an earlier engine let through (seed 001)."""

    after: str = Field(description="The engine that runs first, by name")
    description: str


class Provenance(Strict):
    training_data: str
    intended_use: str
    date: str
    code_revision: str
    metrics: dict[str, float] = Field(default_factory=dict)
    # Percentile bootstrap intervals (low, high) of some of `metrics`, by the same name.
    confidence_intervals: dict[str, tuple[float, float]] = Field(default_factory=dict)


class Manifest(Strict):
    name: str
    version: str
    task: TaskKind
    description: str
    inputs: Inputs
    preprocessing: Preprocessing
    labels: list[Label]
    operating_points: dict[str, OperatingPoint] = Field(default_factory=dict)
    model: ModelFile
    provenance: Provenance
    output: Output | None = None
    cascade: Cascade | None = None
    findings: Findings | None = None
    population: Population | None = None  # the training population, for drift

    @model_validator(mode="after")
    def _findings_fit(self) -> Manifest:
        problems = findings_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def output_names(self) -> list[str]:
        """Every model output the node reads: the declared one, then the findings'."""
        extra = [self.findings.output] if self.findings is not None else []
        return [self.model.output, *extra]


class Bundle:
    """A verified bundle: its manifest and the path of its model file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest = load_model(folder / MANIFEST, Manifest)
        self.model_path = folder / self.manifest.model.file
        actual = sha256_of(self.model_path)
        if actual != self.manifest.model.sha256:
            raise ConfigError(
                [
                    f"{folder / MANIFEST}: model.sha256 does not match {self.model_path.name} "
                    f"(manifest {self.manifest.model.sha256[:12]}..., file {actual[:12]}...): "
                    "the bundle was altered or copied incompletely"
                ]
            )

    @property
    def sha256(self) -> str:
        return self.manifest.model.sha256


def sha256_of(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read model file: {error.strerror}"]) from error


def discover(engines_dir: Path) -> dict[str, Bundle]:
    """Every engine below `engines_dir` by name, in its highest installed version (the one
    that is live by default: cadnode/infer/releases.py); any faulty bundle is an error."""
    highest: dict[str, Bundle] = {}
    for (name, version), bundle in discover_versions(engines_dir).items():
        if name not in highest or version_order(version) > version_order(
            highest[name].manifest.version
        ):
            highest[name] = bundle
    return highest


def discover_versions(engines_dir: Path) -> dict[tuple[str, str], Bundle]:
    """Every bundle below `engines_dir` (any folder with a manifest), by (name, version);
    any faulty bundle, or two folders with the same name and version, is an error."""
    bundles: dict[tuple[str, str], Bundle] = {}
    problems: list[str] = []
    for manifest in sorted(engines_dir.glob(f"*/{MANIFEST}")):
        try:
            bundle = Bundle(manifest.parent)
        except ConfigError as error:
            problems.extend(error.problems)
            continue
        key = (bundle.manifest.name, bundle.manifest.version)
        if key in bundles:
            problems.append(
                f"{manifest}: {key[0]} {key[1]} is installed twice, here and in "
                f"{bundles[key].folder / MANIFEST}: remove one, or give it another version"
            )
            continue
        bundles[key] = bundle
    if problems:
        raise ConfigError(problems)
    return bundles


def version_order(version: str) -> tuple[tuple[int, int | str], ...]:
    """A version's place among its engine's versions: numeric parts compared as numbers
    (0.10.0 after 0.9.0), other parts as text, after numbers."""
    parts = re.split(r"[.\-+_]", version)
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in parts)
