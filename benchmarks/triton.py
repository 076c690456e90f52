"""The shipped engines through NVIDIA Triton Inference Server against ONNX Runtime in the node.

Both run the same model.onnx on the same preprocessed images: ONNX Runtime in this process
(the default backend), and Triton (`backend: triton`, over HTTP and over gRPC) serving a
repository that `cadnode engines export-triton` wrote from the bundles. The server is the
CPU `tritonserver` 2.51 of the nvidia-pytriton wheel (`make triton-server`), whose only
backend is Python's: the exported model.py runs the model with ONNX Runtime on the server's
side, so the difference measured is what Triton adds (the request, its copies, the
dynamic batcher, the Python backend's stub), not a different runtime.

Calls: a single film (the latency a study sees when films arrive one by one), a batch of
`max_batch` films, and one DBT volume's slices in `max_batch` chunks, each the median of
`--rounds` calls interleaved with ONNX Runtime's (benchmarks/inference.py's paired_seconds).
Figures: milliseconds per call and the ratio Triton / ONNX Runtime.

    .venv/bin/python benchmarks/triton.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from benchmarks.inference import chest_batch, dbt_volume, paired_seconds
from cadnode.core.config import EngineSettings, TritonOptions
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.backends import Backend, OnnxRuntimeBackend
from cadnode.infer.bundle import Bundle, discover
from cadnode.infer.preprocess import frames_to_tensor
from cadnode.infer.triton_backend import TritonBackend
from cadnode.infer.triton_repository import ExportOptions, export_repository
from tests.tritonserver import SERVER, Triton, run_triton

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ("http", "grpc")


def workloads(bundles: dict[str, Bundle]) -> list[tuple[str, str, np.ndarray]]:
    """(engine, what, batch): the same inputs for both sides."""
    size = 128  # every shipped engine's preprocessing.size
    assert {bundle.manifest.preprocessing.size for bundle in bundles.values()} == {size}
    films = chest_batch(size)
    slices = frames_to_tensor(dbt_volume(), size, limit=DEFAULT_LIMIT)[0]
    return [
        ("cxr-ruleout", "1 film", films[:1]),
        ("cxr-ruleout", f"{len(films)} films", films),
        ("cxr-segmenter", "1 film", films[:1]),
        ("cxr-segmenter", f"{len(films)} films", films),
        ("dbt-detector", f"volume, {len(slices)} slices", slices),
    ]


def measure(triton: Triton, bundles: dict[str, Bundle], rounds: int) -> None:
    local = {name: OnnxRuntimeBackend(bundle) for name, bundle in bundles.items()}
    served: dict[tuple[str, str], Backend] = {
        (name, protocol): TritonBackend(
            bundle,
            TritonOptions(
                url=triton.grpc_url if protocol == "grpc" else triton.http_url, protocol=protocol
            ),
        )
        for name, bundle in bundles.items()
        for protocol in PROTOCOLS
    }
    print(
        f"{'engine':<14} {'call':<20} {'onnxruntime':>12} {'triton-http':>17} {'triton-grpc':>17}"
    )
    for name, what, batch in workloads(bundles):
        calls = [local[name], *(served[name, protocol] for protocol in PROTOCOLS)]
        reference = calls[0].run(batch)
        for backend in calls[1:]:  # the same answers, or the timing means nothing
            assert np.abs(backend.run(batch) - reference).max() <= 1e-4, (name, backend.name)
        seconds = paired_seconds([partial(backend.run, batch) for backend in calls], rounds)
        base = seconds[0]
        cells = [f"{1000 * s:8.2f} ms {s / base:4.2f}x" for s in seconds[1:]]
        print(f"{name:<14} {what:<20} {1000 * base:9.2f} ms {cells[0]:>17} {cells[1]:>17}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if not SERVER.is_file():
        print(f"Triton: skipped: {SERVER} is not installed (make triton-server)")
        return
    bundles = discover(ROOT / "engines")
    print(
        f"Triton Inference Server (nvidia-pytriton's tritonserver, CPU, Python backend running "
        f"ONNX Runtime) vs ONNX Runtime in the node; {os.cpu_count()} CPU(s), median of "
        f"{args.rounds} calls; ratio = Triton / ONNX Runtime (lower is better)"
    )
    with tempfile.TemporaryDirectory(prefix="cadnode-triton-bench-") as folder:
        repository = Path(folder) / "models"
        export_repository(bundles, repository, EngineSettings(), ExportOptions())
        with run_triton(repository, Path(folder) / "triton.log") as triton:
            measure(triton, bundles, args.rounds)


if __name__ == "__main__":
    main()
