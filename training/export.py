"""ONNX export, and proof that ONNX Runtime computes what PyTorch computed.

The daemon runs the ONNX file, never the PyTorch module, so a bundle is only written when
ONNX Runtime agrees with PyTorch within `TOLERANCE` on real inputs.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

INPUT, OUTPUT = "image", "probability"
OPSET = 18
# Largest accepted |P_onnxruntime - P_torch| on any film of the check batch (relative to the
# value where it exceeds 1, e.g. box coordinates in pixels). Float32 kernels
# differ in summation order, which moves a probability by ~1e-7; 1e-4 is far above that and
# far below any operating-point decision that matters.
TOLERANCE = 1e-4


class ExportMismatch(RuntimeError):
    """ONNX Runtime disagrees with PyTorch: the exported graph is not the trained model."""


def export_onnx(
    model: nn.Module, path: Path, input_size: int, output: str | tuple[str, ...] = OUTPUT
) -> None:
    """Write `model` as ONNX: input "image" (N, 1, S, S) with a dynamic batch, output `output`
    (N, ...): (N,) for a classifier, label maps or boxes for the other engines; a tuple of
    names for a model returning several (the findings engine's P(abnormal) and findings).

    Uses the torch.export-based exporter (the legacy TorchScript one is deprecated); it folds
    BatchNorm into the convolutions and writes the same bytes for the same weights, which
    keeps bundles reproducible.
    """
    model.eval()
    example = torch.zeros(2, 1, input_size, input_size)
    # Torch-internal noise, not ours: a pytree deprecation, and "torchvision is not installed".
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        _export(model, example, path, output)
    _strip_debug_metadata(path)
    onnx.checker.check_model(str(path), full_check=True)


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (Python stack traces with absolute file
    paths and line numbers): with it the bytes, hence the manifest's sha256, would change
    with the checkout's location or any edit above a forward(); without it the same weights
    give the same file anywhere."""
    graph_model = onnx.load(str(path))
    graphs = [graph_model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            graphs += [a.g for a in node.attribute if a.HasField("g")]
            graphs += [g for a in node.attribute for g in a.graphs]
    for function in graph_model.functions:
        for node in function.node:
            del node.metadata_props[:]
    onnx.save(graph_model, str(path))


def _export(
    model: nn.Module, example: torch.Tensor, path: Path, output: str | tuple[str, ...]
) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        verbose=False,
        input_names=[INPUT],
        output_names=[output] if isinstance(output, str) else list(output),
        # By position, not by name: forward's argument may be called anything.
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=OPSET,
        external_data=False,  # one self-contained file, pinned by one sha256
    )


def session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session as the daemon's embedded default would open it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_probabilities(
    path: Path, images: np.ndarray, threads: int, batch_size: int = 64
) -> np.ndarray:
    """The model's (only) output for every image, computed by ONNX Runtime on the file:
    P(abnormal) for the rule-out engine, label maps or boxes for the others."""
    runner = session(path, threads)
    output = runner.get_outputs()[0].name
    chunks = [
        runner.run([output], {INPUT: images[i : i + batch_size]})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks).astype(np.float32)


def torch_probabilities(model: nn.Module, images: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        probability: torch.Tensor = model(torch.from_numpy(images))
    return probability.numpy()


def check_against_torch(
    model: nn.Module, path: Path, images: np.ndarray, threads: int, tolerance: float = TOLERANCE
) -> float:
    """Max |ONNX Runtime - PyTorch| / max(1, |PyTorch|) over `images` (absolute for
    probabilities, relative for a detector's pixel coordinates, whose float32 rounding grows
    with the value); raises ExportMismatch above TOLERANCE."""
    expected = torch_probabilities(model, images)
    actual = onnx_probabilities(path, images, threads)
    if actual.shape != expected.shape:
        raise ExportMismatch(f"{path}: output shape {actual.shape}, PyTorch gave {expected.shape}")
    difference = float(np.max(np.abs(actual - expected) / np.maximum(1.0, np.abs(expected))))
    if not difference <= tolerance:
        raise ExportMismatch(
            f"{path}: ONNX Runtime differs from PyTorch by {difference:.3g} "
            f"(tolerance {tolerance:g}) on {len(images)} images"
        )
    return difference
