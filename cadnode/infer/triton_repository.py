"""`cadnode engines export-triton DIR`: a Triton Inference Server model repository from the
engine bundles.

Per engine, a model named as the engine: `config.pbtxt` (the batch axis up to `max_batch`,
dynamic batching with a queue delay, the input and every output the manifest names (a
multi-label engine's `findings` too) with their dims and types read from `model.onnx`, the
instance kind) and version `1/` holding `model.onnx`. The model is pinned by its SHA-256 in
the config's `parameters` (`sha256`), which the node reads back through Triton's model
configuration API on load and checks against its bundle (cadnode.infer.triton).

Two ways to serve it, `--platform`:
- `python` (the default): Triton's Python backend runs `1/model.py`
  (cadnode/infer/triton_python_model.py) with ONNX Runtime on the CPU, and refuses to load
  a `model.onnx` that does not match the pinned SHA-256. This is what the `nvidia-pytriton`
  wheel's server can run: it ships the Python backend only.
- `onnxruntime`: Triton's own ONNX Runtime backend (`platform: "onnxruntime_onnx"`), as the
  NGC server images ship it; the server then does not check the hash itself.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort
import structlog

from cadnode.core.config import EngineSettings
from cadnode.core.files import write_durably
from cadnode.core.yamlfile import ConfigError
from cadnode.infer import triton_python_model
from cadnode.infer.bundle import Bundle, discover

log = structlog.get_logger("cadnode.infer")

Platform = Literal["python", "onnxruntime"]
InstanceKind = Literal["cpu", "gpu"]
VERSION = "1"  # the one model version a repository exported from a bundle holds
# ONNX tensor element types -> Triton's data types (the shipped engines use float only).
DATA_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL",
}


@dataclass(frozen=True)
class Tensor:
    """One model input or output as Triton declares it: dims without the batch axis."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ExportOptions:
    platform: Platform = "python"
    instance_kind: InstanceKind = "cpu"
    instances: int = 1
    queue_delay_us: int = 500


def model_tensors(bundle: Bundle) -> tuple[Tensor, ...]:
    """The declared input, then every output the manifest names (the declared one, a
    multi-label engine's findings), of the bundle's ONNX model."""
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    manifest = bundle.manifest
    found = {node.name: node for node in (*session.get_inputs(), *session.get_outputs())}
    tensors = []
    for name in (manifest.model.input, *manifest.output_names):
        if name not in found:
            raise ConfigError([f"{bundle.model_path}: has no tensor {name!r} (manifest.yaml)"])
        tensors.append(triton_tensor(bundle, found[name].name, found[name].type, found[name].shape))
    return tuple(tensors)


def triton_tensor(bundle: Bundle, name: str, onnx_type: str, shape: list[object]) -> Tensor:
    if onnx_type not in DATA_TYPES:
        raise ConfigError([f"{bundle.model_path}: tensor {name!r} has type {onnx_type}"])
    if not shape or (isinstance(shape[0], int) and shape[0] > 0):
        # Triton's dynamic batcher needs the first axis to be the batch, sized by the call.
        raise ConfigError([f"{bundle.model_path}: tensor {name!r} has no batch axis ({shape})"])
    dims = tuple(size if isinstance(size, int) and size > 0 else -1 for size in shape[1:])
    return Tensor(name, DATA_TYPES[onnx_type], dims)


def config_text(
    bundle: Bundle, tensors: tuple[Tensor, ...], max_batch: int, options: ExportOptions
) -> str:
    """The model's config.pbtxt (protobuf text format): the input, then every output."""
    manifest = bundle.manifest
    serving = (
        'backend: "python"' if options.platform == "python" else 'platform: "onnxruntime_onnx"'
    )
    kind = "KIND_GPU" if options.instance_kind == "gpu" else "KIND_CPU"
    parameters = {
        "sha256": bundle.sha256,
        "engine": manifest.name,
        "engine_version": manifest.version,
    }
    lines = [
        f'name: "{manifest.name}"',
        serving,
        f"max_batch_size: {max_batch}",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {options.queue_delay_us}",
        "}",
        tensor_block("input", tensors[:1]),
        tensor_block("output", tensors[1:]),
        f"instance_group [ {{ count: {options.instances} kind: {kind} }} ]",
        *(
            f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
            for key, value in parameters.items()
        ),
    ]
    return "\n".join(lines) + "\n"


def tensor_block(kind: str, tensors: tuple[Tensor, ...]) -> str:
    return f"{kind} [ {', '.join(_tensor_entry(tensor) for tensor in tensors)} ]"


def _tensor_entry(tensor: Tensor) -> str:
    # A tensor of one value per item (shape [batch]) has no dims left after the batch axis,
    # which Triton does not accept: it is declared [1] and reshaped to [] for the model.
    dims = tensor.dims or (1,)
    reshape = " reshape: { shape: [ ] }" if not tensor.dims else ""
    return (
        f'{{ name: "{tensor.name}" data_type: {tensor.data_type} '
        f"dims: [ {', '.join(str(size) for size in dims)} ]{reshape} }}"
    )


def export_model(bundle: Bundle, out: Path, max_batch: int, options: ExportOptions) -> Path:
    """One engine's model folder in the repository `out`; its path."""
    folder = out / bundle.manifest.name
    version = folder / VERSION
    version.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors(bundle)
    shutil.copyfile(bundle.model_path, version / "model.onnx")
    if options.platform == "python":
        source = Path(triton_python_model.__file__).read_bytes()
        write_durably(version / "model.py", [source])
    else:
        (version / "model.py").unlink(missing_ok=True)
    text = config_text(bundle, tensors, max_batch, options)
    write_durably(folder / "config.pbtxt", [text.encode()])
    log.info(
        "engine.triton_exported",
        engine=bundle.manifest.name,
        folder=str(folder),
        sha256=bundle.sha256[:12],
        platform=options.platform,
    )
    return folder


def export_repository(
    bundles: dict[str, Bundle], out: Path, settings: EngineSettings, options: ExportOptions
) -> list[Path]:
    """Every bundle as a model of the repository `out`, batches up to its `max_batch`."""
    return [
        export_model(bundle, out, settings.for_engine(name).max_batch, options)
        for name, bundle in sorted(bundles.items())
    ]


# --- the command ---------------------------------------------------------------------------


def add_export_arguments(actions: Any) -> None:
    export = actions.add_parser(
        "export-triton", help="write a Triton Inference Server model repository of the engines"
    )
    export.add_argument("dir", type=Path, metavar="DIR", help="the model repository to write")
    export.add_argument("names", nargs="*", metavar="NAME", help="default: every engine")
    export.add_argument(
        "--platform",
        choices=["python", "onnxruntime"],
        default="python",
        help="python: Triton's Python backend runs model.onnx with ONNX Runtime and checks "
        "its SHA-256 (default); onnxruntime: Triton's own ONNX Runtime backend",
    )
    export.add_argument("--gpu", action="store_true", help="instances of kind KIND_GPU")
    export.add_argument("--instances", type=int, default=1, help="model instances (1)")
    export.add_argument(
        "--queue-delay-us",
        type=int,
        default=ExportOptions.queue_delay_us,
        help="dynamic batching: how long a request may wait for others (microseconds)",
    )


def export_command(settings: EngineSettings, args: argparse.Namespace) -> int:
    """Export the named engines (default: all); exit 1 naming the fault if any is faulty."""
    if args.instances < 1 or args.queue_delay_us < 0:
        print("export-triton: --instances must be >= 1 and --queue-delay-us >= 0")
        return 2
    options = ExportOptions(
        platform=args.platform,
        instance_kind="gpu" if args.gpu else "cpu",
        instances=args.instances,
        queue_delay_us=args.queue_delay_us,
    )
    try:
        bundles = discover(settings.dir)
        unknown = sorted(set(args.names) - set(bundles))
        if unknown:
            raise ConfigError([f"no engine named {name} in {settings.dir}" for name in unknown])
        chosen = {name: bundles[name] for name in args.names or bundles}
        folders = export_repository(chosen, args.dir, settings, options)
    except ConfigError as error:
        print("export-triton: " + "\n  ".join(error.problems))
        return 1
    for folder in folders:
        print(f"{folder}: config.pbtxt, {VERSION}/model.onnx ({options.platform})")
    return 0
