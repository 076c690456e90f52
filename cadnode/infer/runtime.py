"""Engines kept resident: a verified bundle plus a loaded ONNX Runtime session.

Loaded once at start and warmed up with one inference, so the first study pays no load
time. (TensorRT and Triton backends are not built yet; ONNX Runtime on the CPU is the
embedded default.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog
from pydicom import Dataset

from cadnode.infer.bundle import Bundle, TaskKind, discover
from cadnode.preprocess import image_to_tensor
from cadnode.yamlfile import ConfigError

log = structlog.get_logger("cadnode.infer")


class Engine:
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(bundle.model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # ONNX Runtime raises its own untyped errors
            raise ConfigError(
                [f"{bundle.model_path}: ONNX Runtime cannot load it: {error}"]
            ) from error
        size = self.manifest.preprocessing.size
        self._run(np.zeros((1, 1, size, size), dtype=np.float32))  # warm-up
        log.info(
            "engine.loaded",
            engine=self.manifest.name,
            version=self.manifest.version,
            sha256=bundle.sha256[:12],
            backend="onnxruntime",
        )

    @property
    def name(self) -> str:
        return self.manifest.name

    def classify(self, images: Sequence[Dataset]) -> list[dict[str, Any]]:
        """One answer per image: probability of the first label and the operating points."""
        if self.manifest.task is not TaskKind.classify:
            raise ValueError(f"engine {self.name} is a {self.manifest.task} engine, not classify")
        size = self.manifest.preprocessing.size
        batch = np.stack([image_to_tensor(image, size)[0] for image in images])
        probabilities = self._run(batch).reshape(len(images))
        return [self._answer(float(p)) for p in probabilities]

    def _answer(self, probability: float) -> dict[str, Any]:
        """Self-contained, so later stages need nothing from the engine to encode it."""
        points = self.manifest.operating_points
        answer: dict[str, Any] = {
            "label": self.manifest.labels[0].model_dump(),
            "probability": probability,
            "operating_points": {
                name: {
                    "threshold": point.threshold,
                    "reached": probability >= point.threshold,
                    "description": point.description,
                }
                for name, point in points.items()
            },
        }
        if "rule_out" in points:
            answer["ruled_out"] = probability < points["rule_out"].threshold
        return answer

    def _run(self, batch: np.ndarray) -> np.ndarray:
        model = self.manifest.model
        outputs = self.session.run([model.output], {model.input: batch})
        return np.asarray(outputs[0], dtype=np.float32)


def load_engines(engines_dir: Path) -> dict[str, Engine]:
    return {name: Engine(bundle) for name, bundle in discover(engines_dir).items()}
