"""Inference speed: each shipped engine on ONNX Runtime vs PyTorch eager, on the same weights.

The anchor is PyTorch eager running the engine's own training module (training/ruleout.py
RuleoutNet, training/segmenter.py Segmenter, training/findings.py FeaturePyramidSum,
training/detector.py GridDetector, shaped by
training/configs/*.yaml) loaded with the weights of the bundle's model.onnx: every
initializer is copied by name; where the exporter folded a BatchNorm into the convolution
before it, the convolution takes the folded weight and the BatchNorm becomes the identity
carrying the folded bias. The printed max difference shows both compute the same function
(for cxr-findings over both of its outputs, P(abnormal) and the per-label `findings`).
(onnx2torch was tried and not used: it imports torchvision, and no torchvision build for the
pinned CPU torch is available here.)

Figures: images per second for a batch (chest films: `max_batch` films; DBT: one volume's
slices), the ratio ONNX Runtime / PyTorch, and seconds per DBT volume through the daemon's
whole engine call (frames_to_tensor, the model, fusion across slices). A CUDA section runs
TensorRT vs PyTorch on the GPU where torch sees CUDA and tensorrt imports; otherwise it says
why it was skipped.

    .venv/bin/python benchmarks/inference.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from pydicom import Dataset
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from cadnode.core.config import EngineOptions
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.backends import OnnxRuntimeBackend, select_backend
from cadnode.infer.bundle import Bundle
from cadnode.infer.phantoms.breast import make_breast_phantom, tomosynthesis_dataset
from cadnode.infer.phantoms.chest import chest_dataset, make_chest_phantom
from cadnode.infer.preprocess import frames_to_tensor, image_to_tensor
from cadnode.infer.runtime import Engine
from training import detector, findings, ruleout, segmenter

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "training" / "configs"
ENGINES = ROOT / "engines"
CHEST_BATCH = EngineOptions().max_batch
MEASURED = ("cxr-ruleout", "cxr-segmenter", "cxr-findings", "dbt-detector")


def training_module(name: str) -> nn.Module:
    """The engine's PyTorch module as training builds it (untrained)."""
    if name == "cxr-ruleout":
        return ruleout.RuleoutNet(ruleout.load_config(CONFIGS / "ruleout.yaml").model.channels)
    if name == "cxr-segmenter":
        return segmenter.Segmenter(segmenter.load_config(CONFIGS / "segmenter.yaml").model)
    if name == "cxr-findings":
        spec = findings.load_config(CONFIGS / "findings.yaml")
        return findings.FeaturePyramidSum(spec.model, len(spec.labels))
    config = detector.load_config(CONFIGS / "dbt.yaml")
    return detector.GridDetector(config.model, config.input_size)


def load_onnx_weights(module: nn.Module, model_path: Path) -> nn.Module:
    """Give `module` the weights of the exported graph (see the module docstring)."""
    graph = onnx.load(str(model_path)).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    # PReLU slopes lose their names on export; they come in graph order, as the modules do.
    slopes = [weights[node.input[1]] for node in graph.node if node.op_type == "PRelu"]
    state = module.state_dict()
    folded_bias: np.ndarray | None = None
    for name, part in module.named_modules():
        params = {k: v for k, v in weights.items() if k.rsplit(".", 1)[0] == name}
        if isinstance(part, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            state[f"{name}.weight"] = torch.from_numpy(params[f"{name}.weight"].copy())
            if part.bias is not None:
                state[f"{name}.bias"] = torch.from_numpy(params[f"{name}.bias"].copy())
            else:
                folded_bias = weights.get(f"{name}.weight_bias")
        elif isinstance(part, nn.BatchNorm2d):
            if f"{name}.weight" in params:  # kept in the graph: its own statistics
                for key in ("weight", "bias", "running_mean", "running_var"):
                    state[f"{name}.{key}"] = torch.from_numpy(params[f"{name}.{key}"].copy())
            else:  # folded into the convolution before it
                channels = part.num_features
                state[f"{name}.weight"] = torch.ones(channels)
                state[f"{name}.bias"] = (
                    torch.from_numpy(folded_bias.copy())
                    if folded_bias is not None
                    else torch.zeros(channels)
                )
                state[f"{name}.running_mean"] = torch.zeros(channels)
                state[f"{name}.running_var"] = torch.full((channels,), 1.0 - part.eps)
            folded_bias = None
        elif isinstance(part, nn.PReLU):
            state[f"{name}.weight"] = torch.from_numpy(slopes.pop(0).reshape(-1).copy())
    assert not slopes, f"{len(slopes)} PReLU slope(s) of the graph left unused"
    module.load_state_dict(state)
    return module.eval()


def seconds_per_call(call: Callable[[], object], rounds: int) -> float:
    return paired_seconds([call], rounds)[0]


def paired_seconds(calls: list[Callable[[], object]], rounds: int) -> list[float]:
    """Median seconds per call of each, the calls interleaved round by round so that both
    see the same machine load (others' jobs come and go on these shared machines)."""
    for call in calls:
        call()
        call()  # warm: first calls allocate
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, spent in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def chest_batch(size: int) -> np.ndarray:
    films = [
        chest_dataset(
            make_chest_phantom(seed, size=512, pneumothorax=seed % 2 == 1),
            patient_id="BENCH",
            patient_name="Bench^Mark",
            seed=seed,
        )
        for seed in range(CHEST_BATCH)
    ]
    return np.stack([image_to_tensor(film, size, limit=DEFAULT_LIMIT)[0] for film in films])


def dbt_volume() -> Dataset:
    return tomosynthesis_dataset(make_breast_phantom(28, masses=1), patient_id="BENCH", seed=28)


def torch_runner(module: nn.Module, batch: np.ndarray) -> Callable[[], np.ndarray]:
    tensor = torch.from_numpy(batch)

    def run() -> np.ndarray:
        with torch.inference_mode():
            output: torch.Tensor | tuple[torch.Tensor, ...] = module(tensor)
        if isinstance(output, tuple):  # a multi-label engine: every output, side by side
            return side_by_side([part.numpy() for part in output])
        return output.numpy()

    return run


def side_by_side(outputs: list[np.ndarray]) -> np.ndarray:
    """Several outputs of one batch as one (N, ...) array, to compare them at once."""
    return np.concatenate([output.reshape(len(output), -1) for output in outputs], axis=1)


def onnxruntime_runner(backend: OnnxRuntimeBackend, batch: np.ndarray) -> Callable[[], np.ndarray]:
    """The daemon's call: the declared output, or every output a multi-label engine reads."""
    if len(backend.outputs) == 1:
        return lambda: backend.run(batch)
    return lambda: side_by_side(list(backend.run_all(batch).values()))


def cpu_section(rounds: int) -> None:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(
        f"CPU ({threads} cores): ONNX Runtime (default session threads) vs PyTorch "
        f"{torch.__version__} eager ({torch.get_num_threads()} threads); PyTorch runs the "
        "training code's module with weights converted from the ONNX initializers"
    )
    volume = dbt_volume()
    for name in MEASURED:
        bundle = Bundle(ENGINES / name)
        size = bundle.manifest.preprocessing.size
        if name == "dbt-detector":
            batch, unit = frames_to_tensor(volume, size, limit=DEFAULT_LIMIT)[0], "slices"
        else:
            batch, unit = chest_batch(size), "films"
        run_onnx = onnxruntime_runner(OnnxRuntimeBackend(bundle), batch)
        module = load_onnx_weights(training_module(name), bundle.model_path)
        run_torch = torch_runner(module, batch)
        expected = run_torch()
        difference = float(
            np.max(np.abs(run_onnx() - expected) / np.maximum(1.0, np.abs(expected)))
        )
        onnx_s, torch_s = paired_seconds([run_onnx, run_torch], rounds)
        print(
            f"  {name:14s} batch of {len(batch)} {unit}: ONNX Runtime {len(batch) / onnx_s:8.1f}"
            f" {unit}/s, PyTorch eager {len(batch) / torch_s:8.1f} {unit}/s, ratio "
            f"{torch_s / onnx_s:.2f}x (max difference {difference:.1e})"
        )
    engine = Engine(
        Bundle(ENGINES / "dbt-detector"),
        EngineOptions(backend="onnxruntime"),
        max_decoded_bytes=DEFAULT_LIMIT,
    )
    per_volume = seconds_per_call(lambda: engine.answer([volume]), rounds)
    frames = int(volume.NumberOfFrames)
    print(
        f"  dbt-detector, the daemon's engine call on one {frames}-slice volume (windowing, "
        f"model in batches of {engine.options.max_batch}, fusion): {per_volume:.3f} s per volume"
    )


def cuda_section(rounds: int) -> None:
    if not torch.cuda.is_available():
        print(f"CUDA: skipped: torch {torch.__version__} sees no CUDA device (CPU build or no GPU)")
        return
    try:
        import tensorrt
    except ImportError as error:
        print(f"CUDA: skipped: tensorrt does not import ({error}); pip install 'cadnode[gpu]'")
        return
    gpu = torch.cuda.get_device_name()
    print(f"CUDA ({gpu}): TensorRT {tensorrt.__version__} vs PyTorch eager")
    volume = dbt_volume()
    with tempfile.TemporaryDirectory() as plans:
        for name in MEASURED:
            bundle = Bundle(ENGINES / name)
            size = bundle.manifest.preprocessing.size
            if name == "dbt-detector":
                batch = frames_to_tensor(volume, size, limit=DEFAULT_LIMIT)[0]
            else:
                batch = chest_batch(size)
            backend = select_backend(bundle, "tensorrt", max_batch=len(batch), cache=Path(plans))
            module = load_onnx_weights(training_module(name), bundle.model_path).cuda()
            tensor = torch.from_numpy(batch).cuda()

            def run_torch(m: nn.Module = module, t: torch.Tensor = tensor) -> None:
                with torch.inference_mode():
                    m(t)
                torch.cuda.synchronize()

            run_trt = lambda b=backend, x=batch: b.run_all(x)  # noqa: E731
            trt_s, torch_s = paired_seconds([run_trt, run_torch], rounds)
            print(
                f"  {name:14s} batch of {len(batch)}: TensorRT {len(batch) / trt_s:9.1f}/s, "
                f"PyTorch eager {len(batch) / torch_s:9.1f}/s, ratio {torch_s / trt_s:.2f}x "
                "(TensorRT's figure includes host-device copies)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # quiet loads
    print("inference: ratio = ONNX Runtime (or TensorRT) throughput / PyTorch eager throughput")
    cpu_section(args.rounds)
    cuda_section(args.rounds)


if __name__ == "__main__":
    main()
