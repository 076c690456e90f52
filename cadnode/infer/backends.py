"""Engine backends: one interface over ONNX Runtime (CPU, or its CUDA provider), TensorRT,
and a Triton Inference Server (`backend: triton`, cadnode.infer.triton_backend).

An engine hands its backend a preprocessed batch for the model's declared input and gets
the declared output back (`Backend.run`); nothing else in cadnode knows which one runs.

Which one: `engines.backend` or `engines.options.NAME.backend` in the configuration.
`auto` takes TensorRT when `tensorrt` imports and a CUDA GPU is usable, else ONNX Runtime;
`tensorrt` on a machine where it cannot run is a configuration error that says why.

TensorRT runs a *plan*: the ONNX model compiled for one GPU architecture by one TensorRT
version, which no other GPU or TensorRT version may load. So a plan is named for both
(`model.sm89.trt10.5.0.18.plan`) and built from the bundle's `model.onnx` when missing.
Beside it a sidecar (`.plan.json`) records the plan's SHA-256 and the SHA-256 of the ONNX
model it was built from: a plan that was altered, or built from another model, is rebuilt,
never run. The manifest pins `model.onnx` only; the plan is derived from it.

Device memory and the stream come from cuda-python (`cuda.bindings.runtime`, the CUDA
runtime API as NVIDIA's TensorRT samples use it): a few megabytes, where torch would add
gigabytes to a node that does not train. Both `tensorrt` and `cuda-python` are the `gpu`
extra (`pip install 'cadnode[gpu]'`) and are imported only when TensorRT is asked for, so
this module imports on a machine without them.

Not run on a GPU yet: no machine this was written on has one. The TensorRT code follows
the TensorRT 10 Python API as documented (OnnxParser, build_serialized_network,
deserialize_cuda_engine, set_input_shape, set_tensor_address, execute_async_v3); its test
(tests/test_engines.py) runs only where `tensorrt` imports and a GPU is present.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import onnxruntime as ort
import structlog

from cadnode.core.config import EngineSettings, TritonOptions
from cadnode.core.files import write_durably
from cadnode.core.yamlfile import ConfigError
from cadnode.infer.bundle import Bundle, sha256_of

log = structlog.get_logger("cadnode.infer")

Choice = Literal["auto", "onnxruntime", "tensorrt", "triton"]
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"
INSTALL_GPU = "pip install 'cadnode[gpu]'"


class Backend(Protocol):
    """Runs one engine's model: a batch for its declared input -> its declared output, or
    every output the manifest names (`Manifest.output_names`: a multi-label engine's
    findings output too), by name."""

    name: str  # onnxruntime-cpu, onnxruntime-cuda or tensorrt
    detail: str  # for admins: versions, providers, plan file, GPU

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


# --- ONNX Runtime --------------------------------------------------------------------------


def onnxruntime_providers() -> list[str]:
    """CUDA first when this ONNX Runtime build has it (onnxruntime-gpu), the CPU always."""
    available = ort.get_available_providers()
    return [CUDA_PROVIDER, CPU_PROVIDER] if CUDA_PROVIDER in available else [CPU_PROVIDER]


def onnxruntime_name(providers: list[str]) -> str:
    return "onnxruntime-cuda" if providers[0] == CUDA_PROVIDER else "onnxruntime-cpu"


class OnnxRuntimeBackend:
    def __init__(self, bundle: Bundle, intra_op_threads: int = 0) -> None:
        """`intra_op_threads`: threads per model call; 0 lets ONNX Runtime pick (one per
        core), a node's worker processes pass their share of the cores (cadnode/workers.py)."""
        self.model = bundle.manifest.model
        self.outputs = bundle.manifest.output_names
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(
                str(bundle.model_path), options, providers=onnxruntime_providers()
            )
        except Exception as error:  # ONNX Runtime raises its own untyped errors
            raise ConfigError(
                [f"{bundle.model_path}: ONNX Runtime cannot load it: {error}"]
            ) from error
        inputs = [tensor.name for tensor in self.session.get_inputs()]
        outputs = [tensor.name for tensor in self.session.get_outputs()]
        check_io_names(bundle, inputs, outputs)
        providers = self.session.get_providers()
        self.name = onnxruntime_name(providers)
        self.detail = f"ONNX Runtime {ort.__version__}, providers {', '.join(providers)}"

    def run(self, batch: np.ndarray) -> np.ndarray:
        outputs = self.session.run([self.model.output], {self.model.input: batch})
        return np.asarray(outputs[0], dtype=np.float32)

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.outputs, {self.model.input: batch})
        return {
            name: np.asarray(output, dtype=np.float32)
            for name, output in zip(self.outputs, outputs, strict=True)
        }


def check_io_names(bundle: Bundle, inputs: list[str], outputs: list[str]) -> None:
    """The manifest's model.input / model.output (and a multi-label engine's
    findings.output) must be the model's own tensor names."""
    manifest = bundle.manifest
    declared_outputs = [("model.output", manifest.model.output)]
    if manifest.findings is not None:
        declared_outputs.append(("findings.output", manifest.findings.output))
    problems = [
        f"{bundle.folder / 'manifest.yaml'}: {field} is {declared!r}, but "
        f"{bundle.model_path.name} has {kind}s {names}"
        for field, declared, kind, names in (
            ("model.input", manifest.model.input, "input", inputs),
            *((field, name, "output", outputs) for field, name in declared_outputs),
        )
        if declared not in names
    ]
    if problems:
        raise ConfigError(problems)


# --- TensorRT: what this machine has ---------------------------------------------------------


class Unusable(Exception):
    """Why TensorRT cannot run on this machine, in words for the admin."""


@dataclass(frozen=True)
class Gpu:
    name: str
    major: int
    minor: int

    @property
    def arch(self) -> str:
        """Compute capability as CUDA names it: sm89 for 8.9."""
        return f"sm{self.major}{self.minor}"


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as error:
        raise Unusable(_import_problem("tensorrt", error)) from error
    return tensorrt


def import_cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as error:
        raise Unusable(_import_problem("cuda-python", error)) from error
    return runtime


def _import_problem(package: str, error: ImportError) -> str:
    if isinstance(error, ModuleNotFoundError):
        return f"{package} is not installed ({INSTALL_GPU})"
    return f"{package} does not import: {error}"  # installed, but e.g. a library is missing


def cuda_checked(cudart: Any, result: tuple[Any, ...]) -> Any:
    """cuda-python returns (error, values...): raise on an error, else the value(s)."""
    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA runtime error: {error!r}")
    return values[0] if len(values) == 1 else tuple(values)


def local_gpu(cudart: Any) -> Gpu:
    """The GPU that TensorRT will use (device 0), or Unusable saying why there is none."""
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or count < 1:
        raise Unusable(f"no CUDA GPU is usable here (cudaGetDeviceCount: {error!r}, {count})")
    properties = cuda_checked(cudart, cudart.cudaGetDeviceProperties(0))
    name = properties.name
    name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return Gpu(name.rstrip("\x00").strip(), int(properties.major), int(properties.minor))


def tensorrt_stack() -> tuple[Any, Any, Gpu]:
    """tensorrt, the CUDA runtime bindings and the GPU; Unusable when any is missing."""
    trt = import_tensorrt()
    cudart = import_cudart()
    return trt, cudart, local_gpu(cudart)


# --- TensorRT: plans -----------------------------------------------------------------------


@dataclass(frozen=True)
class PlanFile:
    """Where a bundle's plan for this GPU and TensorRT version lies, or will be built."""

    path: Path

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def valid_for(self, bundle: Bundle, max_batch: int) -> str | None:
        """None when the plan may run; else why it may not (it is then rebuilt)."""
        if not self.path.is_file() or not self.sidecar.is_file():
            return "no plan yet"
        try:
            record = json.loads(self.sidecar.read_text(encoding="utf-8"))
            batch = int(record.get("max_batch", 0))
        except (OSError, ValueError, TypeError, AttributeError) as error:
            return f"{self.sidecar}: unreadable ({error})"
        if record.get("onnx_sha256") != bundle.sha256:
            return f"{self.path.name} was built from another model.onnx"
        if batch < max_batch:
            return f"{self.path.name} takes batches of {record.get('max_batch')}, not {max_batch}"
        if sha256_of(self.path) != record.get("plan_sha256"):
            return f"{self.path.name} does not match the SHA-256 in {self.sidecar.name}"
        return None


def plan_name(bundle: Bundle, trt_version: str, gpu: Gpu) -> str:
    """e.g. model.sm89.trt10.5.0.18.plan: never loaded by another GPU or TensorRT version."""
    return f"{Path(bundle.manifest.model.file).stem}.{gpu.arch}.trt{trt_version}.plan"


def plan_candidates(bundle: Bundle, name: str, cache: Path | None) -> list[PlanFile]:
    """Beside the model first (a bundle may ship one), then the node's plan cache.

    A plan is built into the cache when one is given (the engines folder of an install is
    read-only), else beside the model.
    """
    beside = PlanFile(bundle.folder / name)
    if cache is None:
        return [beside]
    return [beside, PlanFile(cache / f"{bundle.manifest.name}-{bundle.sha256[:12]}" / name)]


def ensure_plan(
    bundle: Bundle, trt: Any, gpu: Gpu, *, max_batch: int, cache: Path | None = None
) -> PlanFile:
    """A valid plan for this bundle, GPU and TensorRT version: found, or built now."""
    candidates = plan_candidates(bundle, plan_name(bundle, trt.__version__, gpu), cache)
    reasons = []
    for plan in candidates:
        reason = plan.valid_for(bundle, max_batch)
        if reason is None:
            return plan
        reasons.append(reason)
    target = candidates[-1]
    log.info(
        "engine.plan_building",
        engine=bundle.manifest.name,
        plan=str(target.path),
        why=reasons[-1],
        gpu=gpu.name,
        arch=gpu.arch,
        tensorrt=trt.__version__,
    )
    build_plan(bundle, trt, gpu, target, max_batch=max_batch)
    return target


def build_plan(bundle: Bundle, trt: Any, gpu: Gpu, plan: PlanFile, *, max_batch: int) -> None:
    """Compile model.onnx for this GPU: FP32, batch axis dynamic from 1 to `max_batch`."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (the old flag is gone): no flags needed.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle.model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError([f"{bundle.model_path}: TensorRT cannot parse it: {errors}"])
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    declared = bundle.manifest.model.input
    if declared not in inputs:
        check_io_names(bundle, list(inputs), bundle.manifest.output_names)
    sample = tuple(inputs[declared].shape)[1:]  # (channels, rows, columns); batch is -1
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        # Full FP32, as the thresholds were calibrated on: TF32 would move probabilities.
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    profile.set_shape(declared, (1, *sample), (max_batch, *sample), (max_batch, *sample))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigError([f"{bundle.model_path}: TensorRT could not build a plan for {gpu.arch}"])
    write_durably(plan.path, [bytes(serialized)])
    record = {
        "plan_sha256": sha256_of(plan.path),
        "onnx_sha256": bundle.sha256,
        "engine": bundle.manifest.name,
        "version": bundle.manifest.version,
        "tensorrt": trt.__version__,
        "gpu": gpu.name,
        "compute_capability": f"{gpu.major}.{gpu.minor}",
        "max_batch": max_batch,
        "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_durably(plan.sidecar, [json.dumps(record, indent=2).encode()])


# --- TensorRT: running a plan ------------------------------------------------------------------


class TensorRTBackend:
    """A deserialised plan, one execution context, its device buffers and a CUDA stream.

    Calls are serialised on the one context (a lock): `engines.options.NAME.concurrency`
    above 1 queues them here. Batches larger than the plan's profile are split. Every
    output tensor of the plan gets device memory and is bound (TensorRT 10's
    execute_async_v3 wants an address for each); the manifest's outputs are copied back.
    """

    name = "tensorrt"

    def __init__(
        self,
        bundle: Bundle,
        *,
        max_batch: int,
        cache: Path | None = None,
        stack: tuple[Any, Any, Gpu] | None = None,
    ) -> None:
        trt, cudart, gpu = stack or tensorrt_stack()
        self._trt, self._cudart = trt, cudart
        self.input, self.output = bundle.manifest.model.input, bundle.manifest.model.output
        self.wanted = bundle.manifest.output_names
        self.plan = ensure_plan(bundle, trt, gpu, max_batch=max_batch, cache=cache)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan.path.read_bytes())
        if self._engine is None:
            raise ConfigError([f"{self.plan.path}: TensorRT cannot deserialise this plan"])
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        check_io_names(bundle, names, names)
        self._context = self._engine.create_execution_context()
        self.max_batch = int(self._engine.get_tensor_profile_shape(self.input, 0)[2][0])
        self._lock = threading.Lock()
        self._stream = cuda_checked(cudart, cudart.cudaStreamCreate())
        self._input_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self.input)))
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._output_dtypes = {
            name: np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))) for name in outputs
        }
        largest = tuple(self._engine.get_tensor_profile_shape(self.input, 0)[2])
        self._set_input_shape(largest)
        self._input_memory = self._allocate(largest, self._input_dtype)
        self._output_memory = {
            name: self._allocate(tuple(self._context.get_tensor_shape(name)), dtype)
            for name, dtype in self._output_dtypes.items()
        }
        self.detail = (
            f"TensorRT {trt.__version__} on {gpu.name} ({gpu.arch}), plan {self.plan.path}, "
            f"batch up to {self.max_batch}"
        )

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_all(batch)[self.output]

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            parts = [
                self._run_chunk(batch[start : start + self.max_batch])
                for start in range(0, len(batch), self.max_batch)
            ]
        return {
            name: np.concatenate([part[name] for part in parts]).astype(np.float32, copy=False)
            for name in self.wanted
        }

    def _run_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        cudart = self._cudart
        chunk = np.ascontiguousarray(chunk, dtype=self._input_dtype)
        self._set_input_shape(chunk.shape)
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_checked(
            cudart,
            cudart.cudaMemcpyAsync(
                self._input_memory, chunk.ctypes.data, chunk.nbytes, to_device, self._stream
            ),
        )
        self._context.set_tensor_address(self.input, self._input_memory)
        for name, memory in self._output_memory.items():
            self._context.set_tensor_address(name, memory)
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError(f"TensorRT execute_async_v3 failed on {self.plan.path.name}")
        results = {}
        for name in self.wanted:
            shape = tuple(self._context.get_tensor_shape(name))
            result = np.empty(shape, self._output_dtypes[name])
            cuda_checked(
                cudart,
                cudart.cudaMemcpyAsync(
                    result.ctypes.data,
                    self._output_memory[name],
                    result.nbytes,
                    to_host,
                    self._stream,
                ),
            )
            results[name] = result
        cuda_checked(cudart, cudart.cudaStreamSynchronize(self._stream))
        return results

    def _set_input_shape(self, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(self.input, shape):
            raise RuntimeError(f"{self.plan.path.name}: input shape {shape} is outside its profile")

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
        size = int(np.prod(shape)) * dtype.itemsize
        return int(cuda_checked(self._cudart, self._cudart.cudaMalloc(size)))

    def close(self) -> None:
        """Give the device memory and the stream back (the daemon keeps engines to the end)."""
        cudart = self._cudart
        for memory in (self._input_memory, *self._output_memory.values()):
            cudart.cudaFree(memory)
        cudart.cudaStreamDestroy(self._stream)


# --- choosing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The backend an engine would get here, and why; `fault` when the choice cannot run."""

    backend: str
    why: str
    fault: str | None = None


def decide(choice: Choice) -> Decision:
    """Which backend `choice` means on this machine, without loading any model."""
    if choice == "triton":  # the server is asked when the engine loads, not here
        return Decision("triton", "configured: triton")
    onnxruntime = onnxruntime_name(onnxruntime_providers())
    if choice == "onnxruntime":
        return Decision(onnxruntime, "configured: onnxruntime")
    try:
        _, _, gpu = tensorrt_stack()
    except Unusable as reason:
        if choice == "tensorrt":
            return Decision("tensorrt", "configured: tensorrt", f"TensorRT cannot run: {reason}")
        return Decision(onnxruntime, f"auto: {reason}")
    return Decision("tensorrt", f"{choice}: TensorRT and {gpu.name} ({gpu.arch}) are usable")


def refusal(engine: str, fault: str) -> str:
    return f"engine {engine}: backend tensorrt is configured; {fault}"


def backend_faults(settings: EngineSettings, names: Iterable[str]) -> list[str]:
    """For `cadnode check`: each engine configured for a backend that cannot run here."""
    faults = []
    for name in names:
        decision = decide(settings.for_engine(name).backend or settings.backend)
        if decision.fault is not None:
            faults.append(refusal(name, decision.fault))
    return faults


def select_backend(
    bundle: Bundle,
    choice: Choice = "auto",
    *,
    max_batch: int = 8,
    cache: Path | None = None,
    triton: TritonOptions | None = None,
    intra_op_threads: int = 0,
) -> Backend:
    """Load the bundle's model on the backend `choice` means here; log which and why.

    `triton`: the server of an engine whose choice is `triton` (the configuration requires it).
    """
    engine = bundle.manifest.name
    decision = decide(choice)
    if decision.fault is not None:
        raise ConfigError([refusal(engine, decision.fault)])
    why = decision.why
    backend: Backend
    if decision.backend == "triton":
        from cadnode.infer.triton_backend import TritonBackend  # it uses check_io_names here

        if triton is None:
            raise ConfigError([f"engine {engine}: backend triton is configured without a server"])
        backend = TritonBackend(bundle, triton)
    elif decision.backend == "tensorrt":
        try:
            backend = TensorRTBackend(bundle, max_batch=max_batch, cache=cache)
        except (ConfigError, RuntimeError) as error:
            if choice == "tensorrt":
                raise ConfigError([f"engine {engine}: TensorRT failed: {error}"]) from error
            why = f"auto: TensorRT failed ({error}); ONNX Runtime instead"
            backend = OnnxRuntimeBackend(bundle, intra_op_threads)
    else:
        backend = OnnxRuntimeBackend(bundle, intra_op_threads)
    log.info("engine.backend", engine=engine, backend=backend.name, why=why)
    return backend


def plan_for_bundle(bundle: Bundle, *, max_batch: int = 8) -> str:
    """Build (or find) the bundle's TensorRT plan beside its model; say what happened.

    For `cadnode-train build`: where TensorRT cannot run, the answer says why it was skipped.
    """
    try:
        trt, _, gpu = tensorrt_stack()
    except Unusable as reason:
        return f"TensorRT plan skipped: {reason}"
    try:
        plan = ensure_plan(bundle, trt, gpu, max_batch=max_batch)
    except (ConfigError, RuntimeError) as error:  # the ONNX bundle stands without it
        return f"TensorRT plan NOT built: {error}"
    return f"TensorRT plan {plan.path} (sha256 {sha256_of(plan.path)[:12]}..., {gpu.arch})"
