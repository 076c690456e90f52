"""The Triton Python-backend model that `cadnode engines export-triton` writes as `model.py`.

It runs inside Triton's Python backend stub, not in cadnode: it imports only the standard
library, numpy, onnxruntime and the stub's own `triton_python_backend_utils`, so the stub's
interpreter needs just those (the Makefile's `.venv-triton`). It serves `model.onnx` beside
it with ONNX Runtime on the CPU, where a Triton build has no ONNX Runtime backend of its own
(the `nvidia-pytriton` wheel's server has only the Python backend).

On load it checks `model.onnx` against the SHA-256 the exported config pins (parameter
`sha256`) and refuses to load when they differ, so the server never serves an altered
model under a pinned name; cadnode checks that pin against its bundle in turn.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


class TritonPythonModel:
    """Triton's Python-backend interface: initialize once, execute per batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        model = folder / "model.onnx"
        pinned = config["parameters"]["sha256"]["string_value"]
        with model.open("rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest()
        if actual != pinned:
            raise ValueError(
                f"{model}: SHA-256 {actual[:12]}... does not match the pinned {pinned[:12]}...: "
                "the model was altered; not loaded"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = int(config["parameters"].get("intra_op_threads", {}).get("string_value", 0))
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.input = config["input"][0]["name"]
        # Every output the config declares (a multi-label engine has two), in its order.
        self.outputs = [output["name"] for output in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        """Every request the dynamic batcher gathered, in one model call, split back."""
        import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

        arrays = [
            pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            for request in requests
        ]
        outputs = self.session.run(self.outputs, {self.input: np.concatenate(arrays)})
        bounds = np.cumsum([len(array) for array in arrays])[:-1]
        per_request = zip(*(np.split(output, bounds) for output in outputs), strict=True)
        return [
            pb_utils.InferenceResponse(
                [
                    pb_utils.Tensor(name, np.ascontiguousarray(part))
                    for name, part in zip(self.outputs, parts, strict=True)
                ]
            )
            for parts in per_request
        ]
