"""A real NVIDIA Triton Inference Server for the tests and benchmarks: the `tritonserver`
(2.51, CPU) that the nvidia-pytriton wheel ships, installed in `.venv-triton` by `make
triton-server` (a venv of its own: the wheel pins numpy<2).

Only its Python backend is in the wheel, so the repository is exported with
`--platform python` (cadnode/infer/triton_python_model.py runs model.onnx with ONNX Runtime).
The backend's stub embeds the system's libpython3.11 and takes the first `python3` on PATH
as its interpreter, so `.venv-triton/bin` first on PATH gives it that venv's onnxruntime.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.dicom_validation import in_ci
from tests.peers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-triton"
SITE = VENV / "lib" / "python3.11" / "site-packages"
DIST = SITE / "pytriton" / "tritonserver"
SERVER = DIST / "bin" / "tritonserver"
STUB = DIST / "backends" / "python" / "triton_python_backend_stub"
LIBS = SITE / "nvidia_pytriton.libs"


@dataclass(frozen=True)
class Triton:
    http_port: int
    grpc_port: int
    log: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def models(self) -> dict[str, dict[str, str]]:
        """The repository index: each model's state (READY, UNAVAILABLE...) and reason."""
        reply = httpx.post(f"http://{self.http_url}/v2/repository/index", timeout=5)
        reply.raise_for_status()
        return {entry["name"]: entry for entry in reply.json()}


def require_triton() -> None:
    """Skip without the server (fail under CI, which runs `make test` and so installs it)."""
    if SERVER.is_file() and STUB.is_file():
        return
    reason = f"{SERVER} is not installed (make triton-server)"
    if in_ci():
        pytest.fail(f"{reason}; CI must run the Triton tests, not skip them", pytrace=False)
    pytest.skip(reason)


@contextmanager
def run_triton(repository: Path, log: Path, *, timeout_s: float = 60) -> Iterator[Triton]:
    """The server on free loopback ports over `repository`, once every model has loaded or
    failed to (a model that fails stays UNAVAILABLE, with its reason, and the server runs)."""
    require_triton()
    triton = Triton(http_port=free_port(), grpc_port=free_port(), log=log)
    command = [
        str(SERVER),
        f"--model-repository={repository}",
        f"--backend-directory={DIST / 'backends'}",
        "--http-address=127.0.0.1",
        f"--http-port={triton.http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={triton.grpc_port}",
        "--allow-metrics=false",
        "--exit-on-error=false",
        # The tests' clients keep their connections open: stop without waiting on them.
        "--exit-timeout-secs=2",
        # Python-backend shared memory named for this server: several may run at once.
        f"--backend-config=python,shm-region-prefix-name=cadnode{os.getpid()}_{triton.http_port}_",
    ]
    environment = {
        **os.environ,
        "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '')}",
        "LD_LIBRARY_PATH": str(LIBS),
    }
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=output, env=environment)
    try:
        wait_for(lambda: _settled(triton, process), timeout_s, "Triton's models to load")
        yield triton
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _settled(triton: Triton, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"tritonserver exited ({process.returncode}): see {triton.log}")
    try:
        models = triton.models()
    except httpx.HTTPError:
        return False
    return bool(models) and all(
        entry.get("state") in ("READY", "UNAVAILABLE") for entry in models.values()
    )
