"""Engines kept resident: a verified bundle plus its model loaded on a backend.

Loaded once at start and warmed up with one call of the largest batch it will get, so the
first study pays no load time. The backend (ONNX Runtime or TensorRT, cadnode.infer.backends,
or a Triton server, cadnode.infer.triton_backend) is chosen per engine by configuration.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import structlog
from pydicom import Dataset

from cadnode.core.config import EngineOptions, EngineSettings, LimitsSettings
from cadnode.infer import postprocess
from cadnode.infer.answers import Answer, ClassifyAnswer, DetectAnswer, SegmentAnswer, save_masks
from cadnode.infer.backends import Backend, select_backend
from cadnode.infer.bundle import Bundle, TaskKind, discover_versions
from cadnode.infer.preprocess import Geometry, frames_to_tensor, image_to_tensor

log = structlog.get_logger("cadnode.infer")
Item = TypeVar("Item")


class Engine:
    def __init__(
        self,
        bundle: Bundle,
        options: EngineOptions | None = None,
        *,
        plan_cache: Path | None = None,
        max_decoded_bytes: int,
        intra_op_threads: int = 0,
    ) -> None:
        """`max_decoded_bytes`: an image larger once decoded, or whose codestream disagrees
        with its dataset, is refused before it is decoded (cadnode.dicom.pixels.ImageRefused).
        `intra_op_threads`: ONNX Runtime's threads per call (0: one per core)."""
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.options = options or EngineOptions(backend="auto")
        self.max_decoded_bytes = max_decoded_bytes
        self.backend: Backend = select_backend(
            bundle,
            self.options.backend or "auto",
            max_batch=self.options.max_batch,
            cache=plan_cache,
            triton=self.options.triton,
            intra_op_threads=intra_op_threads,
        )
        self.warm_up()
        log.info(
            "engine.loaded",
            engine=self.manifest.name,
            version=self.manifest.version,
            sha256=bundle.sha256[:12],
            backend=self.backend.name,
        )

    @property
    def name(self) -> str:
        return self.manifest.name

    def answer(
        self, images: Sequence[Dataset], answers_dir: Path | None = None, folder: str = ""
    ) -> list[Answer]:
        """One answer per image (a film, or a whole multi-frame volume), by the task kind.

        A segment engine writes each image's masks to `answers_dir / folder / <SOP Instance
        UID>.npz` (answers.save_masks) and names that file relative to `answers_dir`; without
        `answers_dir` (a dry run, as `cadnode engines verify` makes) nothing is written and
        `mask_file` is empty.
        """
        task = self.manifest.task
        if task is TaskKind.classify:
            return list(self._classify(images))
        if task is TaskKind.segment:
            return list(self._segment(images, answers_dir, folder))
        return [self._detect(image) for image in images]

    def warm_up(self) -> None:
        """One call of the largest batch this engine will be given, so that the first study
        pays no allocation of it: max_batch films, or max_batch slices of a volume."""
        size = self.manifest.preprocessing.size
        self._run(np.zeros((self.options.max_batch, 1, size, size), dtype=np.float32))

    def _classify(self, images: Sequence[Dataset]) -> Iterator[ClassifyAnswer]:
        size = self.manifest.preprocessing.size
        for chunk in _chunks(images, self.options.max_batch):
            batch = np.stack([self._tensor(image, size)[0] for image in chunk])
            if self.manifest.findings is None:
                for probability in self._run(batch).reshape(len(chunk)):
                    yield postprocess.classify_answer(self.manifest, float(probability))
                continue
            # A multi-label engine: its findings output too, one row of labels per image.
            outputs = self.backend.run_all(batch)
            rows = outputs[self.manifest.findings.output].reshape(len(chunk), -1)
            probabilities = outputs[self.manifest.model.output].reshape(len(chunk))
            for probability, row in zip(probabilities, rows, strict=True):
                yield postprocess.classify_answer(self.manifest, float(probability), row.tolist())

    def _segment(
        self, images: Sequence[Dataset], answers_dir: Path | None, folder: str
    ) -> Iterator[SegmentAnswer]:
        size = self.manifest.preprocessing.size
        for chunk in _chunks(images, self.options.max_batch):
            tensors = [self._tensor(image, size) for image in chunk]
            maps = self._run(np.stack([tensor for tensor, _ in tensors]))
            for image, (_, geometry), probabilities in zip(chunk, tensors, maps, strict=True):
                found = postprocess.segment(self.manifest, probabilities, geometry)
                mask_file = ""
                if answers_dir is not None:
                    mask_file = f"{folder}/{image.SOPInstanceUID}.npz".lstrip("/")
                    save_masks(answers_dir / mask_file, found.masks[None])
                yield postprocess.segment_answer(self.manifest, found, geometry, mask_file)

    def _detect(self, volume: Dataset) -> DetectAnswer:
        """Every frame through the model, max_batch slices a call, then fused across slices."""
        size = self.manifest.preprocessing.size
        frames, geometry = frames_to_tensor(volume, size, limit=self.max_decoded_bytes)
        step = self.options.max_batch
        boxes = np.concatenate(
            [self._run(frames[start : start + step]) for start in range(0, len(frames), step)]
        )
        found = postprocess.detect_boxes(self.manifest, boxes, frames, geometry)
        return postprocess.detect_answer(self.manifest, found, len(frames), geometry)

    def _tensor(self, image: Dataset, size: int) -> tuple[np.ndarray, Geometry]:
        return image_to_tensor(image, size, limit=self.max_decoded_bytes)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.backend.run(batch)


def load_engines(
    engines_dir: Path,
    settings: EngineSettings | None = None,
    *,
    limits: LimitsSettings,
    plan_cache: Path | None = None,
    intra_op_threads: int = 0,
) -> dict[str, Engine]:
    """Every bundle in `engines_dir`, every installed version (keyed `engine_key`), each on
    the backend its options pick (`engines.*`, by engine name), decoding images within
    `limits.max_decoded_image_mb`; ONNX Runtime with `intra_op_threads` per call (0: one per
    core)."""
    settings = settings or EngineSettings()
    limit = limits.max_decoded_image_bytes
    return {
        engine_key(name, version): Engine(
            bundle,
            settings.for_engine(name),
            plan_cache=plan_cache,
            max_decoded_bytes=limit,
            intra_op_threads=intra_op_threads,
        )
        for (name, version), bundle in discover_versions(engines_dir).items()
    }


def engine_key(name: str, version: str) -> str:
    """One installed version of an engine, as logs and the infer stage's pools name it."""
    return f"{name}@{version}"


def installed_versions(engines: Iterable[Engine]) -> dict[str, list[str]]:
    """The versions loaded of each engine, by name (what rules and releases check against)."""
    versions: dict[str, list[str]] = {}
    for engine in engines:
        versions.setdefault(engine.name, []).append(engine.manifest.version)
    return versions


def _chunks(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
