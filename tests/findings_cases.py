"""A small multi-label chest bundle for the node's tests, made in milliseconds without training.

Its ONNX graph is tiny but real: the image's mean intensity through one linear layer and a
sigmoid gives `findings` (N, labels), one probability per label; the declared `probability`
(N,) is its first column (abnormal). Which findings an image reports is then set by the
manifest's thresholds alone (0: always, 1: never), so a test knows what the SR must say.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cadnode.infer.bundle import MANIFEST, Bundle, sha256_of

NAME = "cxr-findings"
SIZE = 64
FINDINGS_OUTPUT = "findings"
NO_FINDING = "No Finding"
# (name, SNOMED CT code, meaning): the first is the declared output's, the second the healthy one.
LABELS = [
    ("abnormal", "263654008", "Abnormal"),
    (NO_FINDING, "17621005", "Normal"),
    ("Consolidation", "95436008", "Lung consolidation"),
    ("Pneumothorax", "36118008", "Pneumothorax"),
    ("Nodule", "427359005", "Solitary nodule of lung"),
]
# Thresholds that fix what every image reports: Consolidation and Pneumothorax (urgent too),
# never a Nodule.
ALWAYS, NEVER = 0.0, 1.0
POINTS = {
    "Consolidation": {"report": ALWAYS},
    "Pneumothorax": {"report": ALWAYS, "urgent": ALWAYS},
    "Nodule": {"report": NEVER},
}


def model_bytes() -> bytes:
    """image (N, 1, S, S) -> findings = sigmoid(mean(image) * w + b) (N, L), probability =
    findings[:, 0] (N,)."""
    count = len(LABELS)
    weights = np.linspace(-2.0, 2.0, count, dtype=np.float32).reshape(1, count)
    bias = np.linspace(0.5, -0.5, count, dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["mean", "weights"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], [FINDINGS_OUTPUT]),
        helper.make_node("Gather", [FINDINGS_OUTPUT, "first"], ["probability"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "multilabel",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info(FINDINGS_OUTPUT, TensorProto.FLOAT, ["batch", count]),
        ],
        initializer=[
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "first"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def manifest_document(sha256: str, *, alpha: float = 1.0, beta: float = 1.0) -> dict[str, object]:
    """The manifest as YAML would hold it; alpha = beta = 1: seed 002's rule never fires."""

    def point(threshold: float) -> dict[str, object]:
        return {"threshold": threshold, "description": "test point"}

    return {
        "name": NAME,
        "version": "0.0.1-test",
        "task": "classify",
        "description": "A multi-label test engine (tests/findings_cases.py).",
        "inputs": {
            "modalities": ["DX", "CR"],
            "body_parts": ["CHEST"],
            "views": ["PA", "AP"],
        },
        "preprocessing": {"size": SIZE},
        "labels": [
            {"name": name, "code": {"value": value, "scheme": "SCT", "meaning": meaning}}
            for name, value, meaning in LABELS
        ],
        # Never ruled out, always urgent: the findings decide the test's outcome.
        "operating_points": {"rule_out": point(0.0), "urgent": point(1.0)},
        "model": {"file": "model.onnx", "sha256": sha256},
        "provenance": {
            "training_data": "none: a hand-made graph",
            "intended_use": "tests only",
            "date": "2026-12-06",
            "code_revision": "test",
        },
        "findings": {
            "output": FINDINGS_OUTPUT,
            "healthy": NO_FINDING,
            "prefilter": {"alpha": alpha, "beta": beta},
            "operating_points": {
                label: {name: point(t) for name, t in points.items()}
                for label, points in POINTS.items()
            },
        },
    }


def write_findings_bundle(folder: Path, **prefilter: float) -> Bundle:
    """The bundle in `folder` (created); `prefilter`: alpha, beta for manifest_document."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.onnx"
    model.write_bytes(model_bytes())
    document = manifest_document(sha256_of(model), **prefilter)
    # JSON is YAML: the node's loader reads it as any manifest.
    (folder / MANIFEST).write_text(json.dumps(document, indent=2), encoding="utf-8")
    return Bundle(folder)
