"""The Triton backend against a real Triton Inference Server (tests/tritonserver.py), and
`cadnode engines export-triton`'s model repository.

The server serves a repository exported from the shipped bundles by the CLI, plus a copy of
cxr-ruleout whose model.onnx was swapped for another (its pinned SHA-256 no longer holds).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cadnode.core.config import EngineOptions, EngineSettings, TritonOptions
from cadnode.core.yamlfile import ConfigError
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.backends import OnnxRuntimeBackend, decide
from cadnode.infer.bundle import Bundle, discover, sha256_of
from cadnode.infer.catalogue import model_input
from cadnode.infer.phantoms.chest import chest_dataset, make_chest_phantom
from cadnode.infer.runtime import Engine
from cadnode.infer.sample import sample_images
from cadnode.infer.triton_backend import TritonBackend, TritonError
from cadnode.infer.triton_repository import ExportOptions, export_repository
from tests.peers import free_port
from tests.tritonserver import Triton, run_triton

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ROOT / "engines"
TAMPERED = "cxr-ruleout-tampered"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bundles() -> dict[str, Bundle]:
    return discover(ENGINES)


# --- export-triton, without a server ----------------------------------------------------------


def test_export_writes_a_pinned_repository(tmp_path: Path, bundles: dict[str, Bundle]) -> None:
    settings = EngineSettings.model_validate({"options": {"dbt-detector": {"max_batch": 16}}})
    export_repository(bundles, tmp_path, settings, ExportOptions(queue_delay_us=250))
    for name, bundle in bundles.items():
        folder = tmp_path / name
        assert sha256_of(folder / "1" / "model.onnx") == bundle.sha256
        assert (folder / "1" / "model.py").is_file()
        config = (folder / "config.pbtxt").read_text()
        assert f'name: "{name}"' in config
        assert 'backend: "python"' in config
        assert f'key: "sha256" value: {{ string_value: "{bundle.sha256}" }}' in config
        assert "max_queue_delay_microseconds: 250" in config
        assert "kind: KIND_CPU" in config
        batch = 16 if name == "dbt-detector" else 8
        assert f"max_batch_size: {batch}\n" in config
    ruleout = (tmp_path / "cxr-ruleout" / "config.pbtxt").read_text()
    assert 'input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 128, 128 ] } ]' in ruleout
    # One probability per film: [batch] in ONNX, declared [1] and reshaped for Triton.
    assert 'name: "probability" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] }' in ruleout
    detector = (tmp_path / "dbt-detector" / "config.pbtxt").read_text()
    assert 'name: "boxes" data_type: TYPE_FP32 dims: [ 64, 5 ] }' in detector


def test_export_for_tritons_own_onnxruntime_on_a_gpu(
    tmp_path: Path, bundles: dict[str, Bundle]
) -> None:
    options = ExportOptions(platform="onnxruntime", instance_kind="gpu", instances=2)
    export_repository(
        {"cxr-segmenter": bundles["cxr-segmenter"]}, tmp_path, EngineSettings(), options
    )
    config = (tmp_path / "cxr-segmenter" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config
    assert "backend:" not in config
    assert "count: 2 kind: KIND_GPU" in config
    assert "dims: [ 3, 128, 128 ]" in config
    assert not (tmp_path / "cxr-segmenter" / "1" / "model.py").exists()


def test_backend_triton_needs_its_server() -> None:
    with pytest.raises(ValidationError, match="backend triton needs"):
        EngineOptions.model_validate({"backend": "triton"})
    with pytest.raises(ValidationError, match="url"):
        EngineOptions.model_validate({"backend": "triton", "triton": {"url": "http://x/y"}})
    options = EngineOptions.model_validate(
        {"backend": "triton", "triton": {"url": "triton.local:8001", "protocol": "grpc"}}
    )
    assert options.triton is not None and options.triton.request_timeout_s == 60
    assert decide("triton").backend == "triton"


# --- a real server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    folder = tmp_path_factory.mktemp("triton")
    repository = folder / "models"
    exported = subprocess.run(
        [sys.executable, "-m", "cadnode.cli", "engines", "export-triton", str(repository)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert exported.stdout.count("config.pbtxt") == len(discover(ENGINES)), exported.stdout
    tampered = repository / TAMPERED
    shutil.copytree(repository / "cxr-ruleout", tampered)
    config = tampered / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "cxr-ruleout"', f'name: "{TAMPERED}"'))
    shutil.copyfile(ENGINES / "dbt-detector" / "model.onnx", tampered / "1" / "model.onnx")
    with run_triton(repository, folder / "triton.log") as running:
        yield running


def films(count: int) -> list[np.ndarray]:
    """Chest phantom films through the daemon's preprocessing: normal and abnormal."""
    return [
        chest_dataset(
            make_chest_phantom(5000 + index, size=256, opacity=index % 2 == 1),
            patient_id="TRITON",
            patient_name="Triton^Test",
            seed=5000 + index,
        )
        for index in range(count)
    ]


def through_triton(bundle: Bundle, server: Triton, protocol: str, **extra: str) -> Engine:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    options = EngineOptions.model_validate(
        {"backend": "triton", "triton": {"url": url, "protocol": protocol, **extra}}
    )
    return Engine(bundle, options, max_decoded_bytes=DEFAULT_LIMIT)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_engines_answer_the_same_through_triton(
    server: Triton, bundles: dict[str, Bundle], protocol: str
) -> None:
    for name, bundle in bundles.items():
        engine = through_triton(bundle, server, protocol)
        assert engine.backend.name == f"triton-{protocol}"
        local = OnnxRuntimeBackend(bundle)
        images = films(11) if name.startswith("cxr") else sample_images(bundle.manifest)
        batch = np.concatenate(
            [model_input(bundle.manifest, image, DEFAULT_LIMIT) for image in images]
        )
        # 11: split at 8; every output the manifest names (cxr-findings has two)
        served, expected = engine.backend.run_all(batch), local.run_all(batch)
        assert list(served) == bundle.manifest.output_names, name
        for output, values in served.items():
            assert values.shape == expected[output].shape, (name, output)
            assert np.abs(values - expected[output]).max() <= TOLERANCE, (name, output)
    ruleout = through_triton(bundles["cxr-ruleout"], server, protocol)
    answers = ruleout.answer(films(3))
    reference = Engine(
        bundles["cxr-ruleout"],
        EngineOptions(backend="onnxruntime"),
        max_decoded_bytes=DEFAULT_LIMIT,
    ).answer(films(3))
    for served_answer, local_answer in zip(answers, reference, strict=True):
        assert served_answer.probability == pytest.approx(local_answer.probability, abs=TOLERANCE)  # type: ignore[union-attr]


def test_a_tampered_model_is_refused(server: Triton, bundles: dict[str, Bundle]) -> None:
    state = server.models()[TAMPERED]
    assert state["state"] == "UNAVAILABLE"
    assert "does not match the pinned" in state["reason"]
    with pytest.raises(ConfigError, match=rf"{TAMPERED}.* is not ready: UNAVAILABLE.*SHA-256"):
        through_triton(bundles["cxr-ruleout"], server, "http", model=TAMPERED)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_another_model_under_the_name_is_refused(
    server: Triton, bundles: dict[str, Bundle], protocol: str
) -> None:
    served = bundles["cxr-ruleout"].sha256[:12]
    with pytest.raises(ConfigError, match=rf"serves the model with SHA-256 {served}.*not loaded"):
        through_triton(bundles["cxr-segmenter"], server, protocol, model="cxr-ruleout")


def test_failures_fail_the_engine_call(server: Triton, bundles: dict[str, Bundle]) -> None:
    with pytest.raises(ConfigError, match="the server has no such model"):
        through_triton(bundles["cxr-ruleout"], server, "grpc", model="absent")
    closed = TritonOptions(url=f"127.0.0.1:{free_port()}", connect_timeout_s=2)
    with pytest.raises(ConfigError, match=re.escape(f"Triton at {closed.url} (http)")):
        TritonBackend(bundles["cxr-ruleout"], closed)
    backend = TritonBackend(bundles["cxr-ruleout"], TritonOptions(url=server.http_url))
    wrong_size = np.zeros((2, 1, 64, 64), dtype=np.float32)
    with pytest.raises(TritonError, match="model 'cxr-ruleout'"):
        backend.run(wrong_size)
