"""The admin's view of the engines folder: `cadnode engines list | info NAME | verify [NAME...]`.

`verify` does what the daemon does at start, one bundle at a time, and goes on past a
faulty one: the manifest against its schema (file:line), the SHA-256 of the model file,
the model loaded on the backend the configuration picks, and a test inference on a
built-in sample (cadnode.infer.sample) through the daemon's own preprocessing and engine
call, its output checked for shape and values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset

from cadnode.core.config import EngineSettings, LimitsSettings
from cadnode.core.yamlfile import ConfigError
from cadnode.infer.answers import Answer, ClassifyAnswer, SegmentAnswer, summary
from cadnode.infer.backends import decide
from cadnode.infer.bundle import (
    MANIFEST,
    Bundle,
    Manifest,
    OperatingPoint,
    TaskKind,
    finding_labels,
)
from cadnode.infer.preprocess import frames_to_tensor, image_to_tensor
from cadnode.infer.runtime import Engine
from cadnode.infer.sample import NoSample, sample_images

Say = Callable[[str], None]
CARD = "MODEL_CARD.md"


@dataclass
class Entry:
    """One folder with a manifest: its bundle, or the problems that keep it from loading."""

    folder: Path
    bundle: Bundle | None = None
    problems: Sequence[str] = ()

    @property
    def name(self) -> str:
        return self.bundle.manifest.name if self.bundle else self.folder.name


def entries(engines_dir: Path) -> list[Entry]:
    found: list[Entry] = []
    seen: dict[tuple[str, str], Path] = {}  # (name, version): the first folder with it
    for manifest in sorted(engines_dir.glob(f"*/{MANIFEST}")):
        try:
            bundle = Bundle(manifest.parent)
        except ConfigError as error:
            found.append(Entry(manifest.parent, problems=error.problems))
            continue
        key = (bundle.manifest.name, bundle.manifest.version)
        if key in seen:
            twice = f"{key[0]} {key[1]} is installed twice, here and in {seen[key]}"
            found.append(Entry(manifest.parent, problems=[f"{manifest}: {twice}"]))
            continue
        seen[key] = manifest.parent
        found.append(Entry(manifest.parent, bundle))
    return found


def backend_column(settings: EngineSettings, name: str) -> str:
    decision = decide(settings.for_engine(name).backend or settings.backend)
    return decision.backend if decision.fault is None else f"{decision.backend}(unusable)"


def list_engines(
    settings: EngineSettings,
    say: Say = print,
    roles: Mapping[tuple[str, str], str] | None = None,
) -> int:
    """A table of the bundles, every installed version with its release role (`roles`, by
    name and version: cadnode/infer/releases.py); exit status 1 when any of them is faulty."""
    found = entries(settings.dir)
    if not found:
        say(f"no engine bundles in {settings.dir} (a folder per engine, with {MANIFEST})")
        return 1
    roles = roles or {}
    say(
        f"{'NAME':<16} {'VERSION':<8} {'ROLE':<9} {'TASK':<9} {'BACKEND':<18} {'SHA256':<12}  "
        "LABELS"
    )
    for entry in found:
        if entry.bundle is None:
            say(f"{entry.name:<16} FAULT: {entry.problems[0]}")
            continue
        manifest = entry.bundle.manifest
        labels = ", ".join(label.name for label in manifest.labels)
        role = roles.get((manifest.name, manifest.version), "?")
        say(
            f"{manifest.name:<16} {manifest.version:<8} {role:<9} {manifest.task.value:<9} "
            f"{backend_column(settings, manifest.name):<18} {entry.bundle.sha256[:12]}  {labels}"
        )
    return 1 if any(entry.bundle is None for entry in found) else 0


def find_bundle(settings: EngineSettings, name: str) -> Bundle:
    """The bundle named `name` (manifest name, or its folder's name); ConfigError if none."""
    for entry in entries(settings.dir):
        if name in (entry.name, entry.folder.name):
            if entry.bundle is None:
                raise ConfigError(list(entry.problems))
            return entry.bundle
    raise ConfigError([f"{settings.dir}: no engine bundle named {name!r}"])


def describe(settings: EngineSettings, name: str, say: Say = print) -> int:
    """`cadnode engines info NAME`: what the manifest says, for an admin."""
    bundle = find_bundle(settings, name)
    for line in manifest_lines(bundle, settings):
        say(line)
    return 0


def manifest_lines(bundle: Bundle, settings: EngineSettings) -> list[str]:
    manifest = bundle.manifest
    decision = decide(settings.for_engine(manifest.name).backend or settings.backend)
    inputs = manifest.inputs
    lines = [
        f"{manifest.name} {manifest.version} ({manifest.task.value})",
        f"  {manifest.description}",
        f"  bundle: {bundle.folder}",
        f"  model: {manifest.model.file} sha256 {manifest.model.sha256}",
        f"         input {manifest.model.input!r} -> output {manifest.model.output!r}",
        f"  backend here: {decision.backend} ({decision.fault or decision.why})",
        "  inputs:",
        f"    modalities: {_joined(inputs.modalities)}",
        f"    SOP classes: {_joined(inputs.sop_classes)}",
        f"    body parts: {_joined(inputs.body_parts)}",
        f"    views: {_joined(inputs.views)}",
        f"  preprocessing: {_preprocessing(manifest)}",
        "  labels:",
    ]
    for label in manifest.labels:
        code = label.code
        category = (
            f"; category {label.category.scheme} {label.category.value} {label.category.meaning!r}"
            if label.category
            else ""
        )
        lines.append(f"    {label.name}: {code.scheme} {code.value} {code.meaning!r}{category}")
    lines.append("  operating points:" if manifest.operating_points else "  operating points: none")
    lines += [
        f"    {name}: {_point(point)}\n      {point.description}"
        for name, point in manifest.operating_points.items()
    ]
    if manifest.output is not None:
        output = manifest.output
        fields = f" fields {_joined(output.fields)}" if output.fields else ""
        lines.append(f"  output: [{', '.join(output.shape)}]{fields}: {output.description}")
    lines += _findings_lines(manifest)
    if manifest.cascade is not None:
        lines.append(f"  cascade: after {manifest.cascade.after}: {manifest.cascade.description}")
    provenance = manifest.provenance
    lines += [
        "  provenance:",
        f"    training data: {provenance.training_data}",
        f"    intended use: {provenance.intended_use}",
        f"    date: {provenance.date}; code revision: {provenance.code_revision}",
    ]
    for metric, value in provenance.metrics.items():
        interval = provenance.confidence_intervals.get(metric)
        bounds = f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
        lines.append(f"    {metric}: {value:.4f}{bounds}")
    card = bundle.folder / CARD
    lines.append(f"  model card: {card if card.is_file() else 'none in the bundle'}")
    return lines


def _findings_lines(manifest: Manifest) -> list[str]:
    """A multi-label engine's second output, healthy label, seed 002 rule, and points."""
    findings = manifest.findings
    if findings is None:
        return []
    lines = [f"  findings: output {findings.output!r}, one probability per label"]
    if findings.healthy is not None:
        rule = findings.prefilter
        decided = f", prefilter alpha {rule.alpha:g} beta {rule.beta:g}" if rule else ""
        lines.append(f"    healthy label: {findings.healthy}{decided}")
    for name, points in findings.operating_points.items():
        lines += [f"    {name} {point}: {_point(p)}" for point, p in points.items()]
    return lines


def _joined(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "any"


def _preprocessing(manifest: Manifest) -> str:
    size = manifest.preprocessing.size
    frames = (
        "every frame windowed from its functional groups"
        if _volumes(manifest)
        else ("rescale, VOI LUT or window, MONOCHROME1 inverted")
    )
    return f"{frames}; scaled to [0, 1], fitted into {size} x {size} px keeping aspect"


def _point(point: OperatingPoint) -> str:
    parts = [f"threshold {point.threshold:.4f}"]
    for figure, value, interval in (
        ("sensitivity", point.sensitivity, point.sensitivity_ci),
        ("specificity", point.specificity, point.specificity_ci),
    ):
        if value is not None:
            bounds = f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
            parts.append(f"{figure} {value:.4f}{bounds}")
    return "; ".join(parts)


# --- verify ------------------------------------------------------------------------------------


def verify(
    settings: EngineSettings,
    names: Sequence[str] = (),
    *,
    limits: LimitsSettings,
    plan_cache: Path | None = None,
    say: Say = print,
) -> int:
    """OK or FAULT (with the reason) per bundle; exit status 1 when any is faulty."""
    found = entries(settings.dir)
    chosen = [e for e in found if not names or {e.name, e.folder.name} & set(names)]
    faults = 0
    for missing in sorted(set(names) - {n for e in found for n in (e.name, e.folder.name)}):
        say(f"FAULT {missing}: {settings.dir}: no engine bundle named {missing!r}")
        faults += 1
    if not found:
        say(f"FAULT: no engine bundles in {settings.dir}")
        return 1
    for entry in chosen:
        try:
            summary = _verify_bundle(entry, settings, limits, plan_cache)
        except (ConfigError, NoSample, SampleFault) as error:
            problems = error.problems if isinstance(error, ConfigError) else [str(error)]
            say(f"FAULT {entry.name}: " + "\n      ".join(problems))
            faults += 1
        else:
            say(f"OK    {entry.name}: {summary}")
    return 1 if faults else 0


class SampleFault(Exception):
    """The engine ran on the sample, but what it answered is wrong."""


def _verify_bundle(
    entry: Entry, settings: EngineSettings, limits: LimitsSettings, plan_cache: Path | None
) -> str:
    if entry.bundle is None:  # the manifest's schema or the model's hash
        raise ConfigError(list(entry.problems))
    bundle = entry.bundle
    manifest = bundle.manifest
    engine = Engine(
        bundle,
        settings.for_engine(manifest.name),
        plan_cache=plan_cache,
        max_decoded_bytes=limits.max_decoded_image_bytes,
    )
    images = sample_images(manifest)
    try:
        checked = [check_raw(engine, image) for image in images]
        answered = run_answer(engine, images)
    except SampleFault:
        raise
    except Exception as error:  # any failure of the engine call is this bundle's fault
        raise SampleFault(f"test inference failed: {type(error).__name__}: {error}") from error
    sample = f"{len(images)} sample {images[0].Modality} image(s)"
    return (
        f"{manifest.version}, sha256 {bundle.sha256[:12]} verified, {engine.backend.name}, "
        f"{sample}: model output {', '.join(checked)} finite, probabilities in [0, 1]{answered}"
    )


def model_input(manifest: Manifest, image: Dataset, limit: int) -> np.ndarray:
    """The daemon's preprocessing: every frame of a volume for a detector, else one image;
    decoded within `limit` bytes (cadnode.dicom.pixels)."""
    size = manifest.preprocessing.size
    if _volumes(manifest):
        return frames_to_tensor(image, size, limit=limit)[0]
    return image_to_tensor(image, size, limit=limit)[0][None]


def _volumes(manifest: Manifest) -> bool:
    return manifest.task is TaskKind.detect


def check_raw(engine: Engine, image: Dataset) -> str:
    """The backend's own output for one sample image (a film, or a volume's frames)."""
    manifest = engine.manifest
    batch = model_input(manifest, image, engine.max_decoded_bytes)
    if manifest.findings is None:
        return check_output(manifest, engine.backend.run(batch), len(batch))
    outputs = engine.backend.run_all(batch)
    findings = outputs[manifest.findings.output]
    declared = check_output(manifest, outputs[manifest.model.output], len(batch))
    _check_values(f"{manifest.findings.output} output", findings, findings)
    expected = (len(batch), len(manifest.labels))
    if findings.shape != expected:
        raise SampleFault(
            f"{manifest.findings.output} output shape {findings.shape}, "
            f"expected {expected} (one probability per label)"
        )
    return f"{declared} and {manifest.findings.output} {findings.shape}"


def check_output(manifest: Manifest, output: np.ndarray, count: int) -> str:
    """Shape as the manifest declares it (`count` first), every value finite, probabilities
    in [0, 1]."""
    size, labels = manifest.preprocessing.size, len(manifest.labels)
    if manifest.task is TaskKind.classify:
        expected: tuple[int | None, ...] = (count,)
        probabilities = output
    elif manifest.task is TaskKind.segment:
        expected = (count, labels, size, size)
        probabilities = output
    else:
        fields = manifest.output.fields if manifest.output else []
        expected = (count, None, len(fields))
        probabilities = output[..., fields.index("score")] if "score" in fields else output[:0]
    shape = output.shape
    matches = len(shape) == len(expected) and all(
        e in (None, s) for e, s in zip(expected, shape, strict=True)
    )
    _check_values("output", output, probabilities)
    if not matches:
        wanted = ", ".join("N" if e is None else str(e) for e in expected)
        raise SampleFault(f"output shape {shape}, expected ({wanted})")
    return str(shape)


def _check_values(name: str, output: np.ndarray, probabilities: np.ndarray) -> None:
    """Every value finite, the probabilities among them in [0, 1]."""
    if not np.isfinite(output).all():
        raise SampleFault(f"{name} has {int((~np.isfinite(output)).sum())} non-finite value(s)")
    if probabilities.size and not (probabilities.min() >= 0 and probabilities.max() <= 1):
        low, high = float(probabilities.min()), float(probabilities.max())
        raise SampleFault(f"probabilities outside [0, 1]: {low:.4g} .. {high:.4g}")


def run_answer(engine: Engine, images: list[Dataset]) -> str:
    """The daemon's own engine call (`Engine.answer`, a dry run: no masks written)."""
    answers = engine.answer(images)
    if len(answers) != len(images):
        raise SampleFault(f"{len(answers)} answer(s) for {len(images)} image(s)")
    task = engine.manifest.task.value
    probabilities = []
    for answer in answers:
        if answer.task != task:
            raise SampleFault(f"a {answer.task} answer from a {task} engine")
        if isinstance(answer, SegmentAnswer):
            probabilities += [finding.probability for finding in answer.findings]
        else:
            probabilities.append(answer.probability)
    values = np.asarray(probabilities, dtype=np.float64)
    if not (np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()):
        raise SampleFault(f"answer probabilities not all in [0, 1]: {probabilities}")
    shown = ", ".join(f"{value:.3f}" for value in probabilities)
    return f"; answers p = {shown}" + _reported(engine.manifest, answers)


def _reported(manifest: Manifest, answers: Sequence[Answer]) -> str:
    """A multi-label engine's answers: each finding present, and what each image reports."""
    if manifest.findings is None:
        return ""
    wanted = finding_labels(manifest)
    said = []
    for answer in answers:
        assert isinstance(answer, ClassifyAnswer)
        if [finding.label.name for finding in answer.findings] != wanted:
            raise SampleFault(f"answer findings {answer.findings!r}, expected one per {wanted}")
        said.append(summary(answer))
    return "; reported: " + " | ".join(said)
