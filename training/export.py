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
# Largest accepted |P_onnxruntime - P_torch| on any film of the check batch. Float32 kernels
# differ in summation order, which moves a probability by ~1e-7; 1e-4 is far above that and
# far below any operating-point decision that matters.
TOLERANCE = 1e-4


class ExportMismatch(RuntimeError):
    """ONNX Runtime disagrees with PyTorch: the exported graph is not the trained model."""


def export_onnx(model: nn.Module, path: Path, input_size: int) -> None:
    """Write `model` as ONNX: input "image" (N, 1, S, S) with a dynamic batch, output (N,).

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
        _export(model, example, path)
    onnx.checker.check_model(str(path), full_check=True)


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        verbose=False,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
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
    """P(abnormal) for every image, computed by ONNX Runtime on the exported file."""
    runner = session(path, threads)
    chunks = [
        runner.run([OUTPUT], {INPUT: images[i : i + batch_size]})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks).astype(np.float32)


def torch_probabilities(model: nn.Module, images: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        probability: torch.Tensor = model(torch.from_numpy(images))
    return probability.numpy()


def check_against_torch(model: nn.Module, path: Path, images: np.ndarray, threads: int) -> float:
    """Max |ONNX Runtime - PyTorch| over `images`; raises ExportMismatch above TOLERANCE."""
    expected = torch_probabilities(model, images)
    actual = onnx_probabilities(path, images, threads)
    if actual.shape != expected.shape:
        raise ExportMismatch(f"{path}: output shape {actual.shape}, PyTorch gave {expected.shape}")
    difference = float(np.max(np.abs(actual - expected)))
    if not difference <= TOLERANCE:
        raise ExportMismatch(
            f"{path}: ONNX Runtime differs from PyTorch by {difference:.3g} "
            f"(tolerance {TOLERANCE:g}) on {len(images)} images"
        )
    return difference
