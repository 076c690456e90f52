"""Engine bundles: a folder with `manifest.yaml` and the model files it lists.

The manifest says what the engine is (task kind, accepted inputs, preprocessing, labels
with codes, operating points, provenance) and pins every model file by SHA-256, which is
checked on load: a tampered or half-copied bundle is refused, never run.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

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
    """Every bundle below `engines_dir`, by engine name; any faulty bundle is an error."""
    bundles: dict[str, Bundle] = {}
    problems: list[str] = []
    for manifest in sorted(engines_dir.glob(f"*/{MANIFEST}")):
        try:
            bundle = Bundle(manifest.parent)
        except ConfigError as error:
            problems.extend(error.problems)
            continue
        bundles[bundle.manifest.name] = bundle
    if problems:
        raise ConfigError(problems)
    return bundles
