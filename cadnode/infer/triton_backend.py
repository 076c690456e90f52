"""The Triton backend: an engine's model served by NVIDIA Triton Inference Server.

`engines.options.NAME: {backend: triton, triton: {url, protocol, model, version, ...}}`.
The node sends each batch to the server (tritonclient, HTTP or gRPC) and gets the model's
output back, as from ONNX Runtime in the process (cadnode.infer.backends.Backend).

On load the server must be live and the model ready, and the model's configuration must
pin the bundle's own model: its `sha256` parameter (written by `cadnode engines
export-triton`, cadnode.infer.triton_repository) equal to the manifest's SHA-256. A server
serving another model, or another version of it, under the engine's name is refused, never
used. (The exported Python-backend model checks its `model.onnx` against that parameter in
turn on the server, so the pin holds from the bundle to the file the server runs.)

A failed or timed-out request raises TritonError, which fails the engine call like any
other: the job is retried per `engines.max_attempts`.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import structlog

from cadnode.core.config import TritonOptions
from cadnode.core.yamlfile import ConfigError
from cadnode.infer.bundle import Bundle

log = structlog.get_logger("cadnode.infer")
INSTALL_TRITON = "pip install 'cadnode[triton]'"


class TritonError(RuntimeError):
    """A request to the server failed or timed out: this engine call fails."""


def client_module(protocol: str) -> Any:
    """tritonclient's HTTP or gRPC module; a ConfigError saying how to install it if absent."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError as error:
        raise ConfigError([f"tritonclient is not usable ({error}): {INSTALL_TRITON}"]) from error
    return module


class TritonBackend:
    """One engine's model on a Triton server; one client per calling thread (the HTTP
    client is not thread-safe, and the infer stage calls an engine from its own pool)."""

    def __init__(self, bundle: Bundle, options: TritonOptions) -> None:
        self.engine = bundle.manifest.name
        self.options = options
        self.model = options.model or self.engine
        self.version = options.version
        self.name = f"triton-{options.protocol}"
        self._module = client_module(options.protocol)
        self._local = threading.local()
        self.where = f"Triton at {options.url} ({options.protocol}), model {self.model!r}"
        try:
            config, server_version = self._load_config()
        except ConfigError:
            raise
        except Exception as error:  # tritonclient raises its own and the transport's errors
            raise ConfigError([f"engine {self.engine}: {self.where}: {error}"]) from error
        check_pin(bundle, config, self.where)
        self._read_io(bundle, config)
        version = self.version or "latest"
        self.detail = (
            f"Triton {server_version} at {options.url} ({options.protocol}), model "
            f"{self.model} version {version}, sha256 {bundle.sha256[:12]} pinned"
        )
        log.info(
            "engine.triton_ready",
            engine=self.engine,
            url=options.url,
            protocol=options.protocol,
            model=self.model,
            version=version,
        )

    # --- load ---------------------------------------------------------------------------

    def _load_config(self) -> tuple[dict[str, Any], str]:
        """The model's configuration and the server's version, once it is live and ready."""
        client, timeouts = self._client(), self._timeouts()
        if not client.is_server_live(**timeouts):
            raise ConfigError([f"engine {self.engine}: {self.where}: the server is not live"])
        if not client.is_model_ready(self.model, self.version, **timeouts):
            why = self._unready_reason(client)
            raise ConfigError([f"engine {self.engine}: {self.where} is not ready: {why}"])
        config = client.get_model_config(self.model, self.version, **self._as_json(), **timeouts)
        metadata = client.get_server_metadata(**self._as_json(), **timeouts)
        config = config.get("config", config)  # gRPC wraps it, HTTP does not
        return config, str(metadata.get("version", "?"))

    def _unready_reason(self, client: Any) -> str:
        """What the server says about the model: unknown, loading, or why it failed."""
        index = client.get_model_repository_index(**self._as_json(), **self._timeouts())
        entries = index.get("models", []) if isinstance(index, dict) else index
        for entry in entries:
            if entry.get("name") == self.model and self.version in ("", entry.get("version")):
                state = entry.get("state", "UNKNOWN")
                reason = str(entry.get("reason", "")).strip().splitlines()
                return f"{state}: {reason[0]}" if reason else state
        return "the server has no such model"

    def _read_io(self, bundle: Bundle, config: dict[str, Any]) -> None:
        from tritonclient.utils import triton_to_np_dtype

        from cadnode.infer.backends import check_io_names

        inputs = {tensor["name"]: tensor for tensor in config.get("input", [])}
        outputs = {tensor["name"]: tensor for tensor in config.get("output", [])}
        check_io_names(bundle, list(inputs), list(outputs))
        declared = bundle.manifest.model
        self.input, self.output = declared.input, declared.output
        self._datatype = str(inputs[self.input]["data_type"]).removeprefix("TYPE_")
        self._input_dtype = np.dtype(triton_to_np_dtype(self._datatype))
        self.max_batch = max(int(config.get("max_batch_size", 0)), 1)
        # Every output the manifest names (a multi-label engine's findings too), its dims.
        self._output_dims = {
            name: _dims(outputs[name]) for name in bundle.manifest.output_names
        }

    # --- run ------------------------------------------------------------------------------

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The batch in requests of at most the model's max_batch_size."""
        return self.run_all(batch)[self.output]

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output the manifest names, the batch in requests of at most max_batch_size."""
        parts = [
            self._request(batch[start : start + self.max_batch])
            for start in range(0, len(batch), self.max_batch)
        ]
        return {
            name: np.concatenate([part[name] for part in parts]).astype(np.float32, copy=False)
            for name in self._output_dims
        }

    def _request(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        module = self._module
        chunk = np.ascontiguousarray(chunk, dtype=self._input_dtype)
        request = module.InferInput(self.input, list(chunk.shape), self._datatype)
        request.set_data_from_numpy(chunk)
        wanted = [module.InferRequestedOutput(name) for name in self._output_dims]
        try:
            result = self._client().infer(
                self.model, [request], self.version, outputs=wanted, **self._timeouts()
            )
            outputs = {name: result.as_numpy(name) for name in self._output_dims}
        except Exception as error:  # the server's refusal, a timeout, a dropped connection
            raise TritonError(f"{self.where}: {type(error).__name__}: {error}") from error
        answered = {}
        for name, output in outputs.items():
            if output is None:
                raise TritonError(f"{self.where}: the answer has no output {name!r}")
            answered[name] = np.asarray(output).reshape((len(chunk), *self._output_dims[name]))
        return answered

    # --- clients ----------------------------------------------------------------------------

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            options = self.options
            if options.protocol == "grpc":
                client = self._module.InferenceServerClient(options.url)
            else:
                client = self._module.InferenceServerClient(
                    options.url,
                    connection_timeout=options.connect_timeout_s,
                    network_timeout=options.request_timeout_s,
                )
            self._local.client = client
        return client

    def _timeouts(self) -> dict[str, float]:
        """gRPC takes a deadline per call; the HTTP client has its timeouts from the start."""
        if self.options.protocol == "grpc":
            return {"client_timeout": self.options.request_timeout_s}
        return {}

    def _as_json(self) -> dict[str, bool]:
        return {"as_json": True} if self.options.protocol == "grpc" else {}


def _dims(output: dict[str, Any]) -> tuple[int, ...]:
    """An output's dims past the batch axis, as the model sees them (after a reshape)."""
    dims = output["reshape"].get("shape", []) if "reshape" in output else output["dims"]
    return tuple(int(size) for size in dims)


def check_pin(bundle: Bundle, config: dict[str, Any], where: str) -> None:
    """The served model must be the bundle's: its `sha256` parameter equal to the manifest's."""
    engine = bundle.manifest.name
    parameter = config.get("parameters", {}).get("sha256", {})
    served = str(parameter.get("string_value", "")) if isinstance(parameter, dict) else ""
    if not served:
        raise ConfigError(
            [
                f"engine {engine}: {where} has no `sha256` parameter in its configuration, so "
                "it cannot be checked against the bundle: export it with `cadnode engines "
                "export-triton`"
            ]
        )
    if served != bundle.sha256:
        raise ConfigError(
            [
                f"engine {engine}: {where} serves the model with SHA-256 {served[:12]}..., but "
                f"the bundle pins {bundle.sha256[:12]}... ({bundle.folder / 'manifest.yaml'}): "
                "another model or another version of it; not loaded"
            ]
        )
