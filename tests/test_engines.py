"""Engine backends and the `cadnode engines` commands (list, info, verify).

This machine has no GPU and no TensorRT: the backend tests check what the node does here
(ONNX Runtime on the CPU; TensorRT refused with its reason). The TensorRT test runs only
where `tensorrt` and `cuda-python` import and a CUDA GPU is usable, and skips elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import structlog

from cadnode.core.yamlfile import ConfigError
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.backends import (
    Gpu,
    OnnxRuntimeBackend,
    PlanFile,
    Unusable,
    decide,
    plan_for_bundle,
    plan_name,
    select_backend,
)
from cadnode.infer.bundle import Bundle, sha256_of
from cadnode.infer.catalogue import SampleFault, check_output, model_input
from cadnode.infer.sample import sample_images
from tests.peers import REPO

ENGINES = REPO / "engines"
NAMES = ("cxr-findings", "cxr-ruleout", "cxr-segmenter", "dbt-detector")
CADNODE = Path(sys.executable).parent / "cadnode"  # the venv's console script
# Largest |P_TensorRT - P_ONNX Runtime| accepted: both compute in FP32 (the plan is built
# without TF32); kernels differ in summation order only.
TENSORRT_TOLERANCE = 1e-3


def tensorrt_usable() -> bool:
    return decide("tensorrt").fault is None


needs_no_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None and tensorrt_usable(),
    reason="TensorRT and a GPU are usable here: auto picks TensorRT",
)


def copy_bundle(tmp_path: Path, name: str = "cxr-ruleout") -> Path:
    folder = tmp_path / "engines" / name
    shutil.copytree(ENGINES / name, folder)
    return folder


def cadnode(
    *args: str, engines: Path, data: Path, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "CADNODE_ENGINES_DIR": str(engines),
        "CADNODE_DATA_DIR": str(data),
    }
    if config is not None:
        env["CADNODE_CONFIG"] = str(config)
    return subprocess.run(
        [str(CADNODE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
        env=env,
    )


# --- backend selection -------------------------------------------------------------------------


@needs_no_tensorrt
def test_auto_runs_onnxruntime_on_the_cpu_and_logs_why() -> None:
    bundle = Bundle(ENGINES / "cxr-ruleout")
    with structlog.testing.capture_logs() as events:
        backend = select_backend(bundle, "auto")
    assert backend.name == "onnxruntime-cpu"
    assert "CPUExecutionProvider" in backend.detail
    chosen = [e for e in events if e["event"] == "engine.backend"]
    assert len(chosen) == 1
    assert chosen[0]["engine"] == "cxr-ruleout"
    assert chosen[0]["backend"] == "onnxruntime-cpu"
    assert chosen[0]["why"].startswith("auto: ")
    assert "not installed" in chosen[0]["why"] or "no CUDA GPU" in chosen[0]["why"]
    films = sample_images(bundle.manifest)
    batch = np.concatenate([model_input(bundle.manifest, film, DEFAULT_LIMIT) for film in films])
    probabilities = backend.run(batch)
    assert probabilities.shape == (2,)
    assert probabilities[0] < 0.5 < probabilities[1]  # the normal sample, the abnormal one


@needs_no_tensorrt
def test_tensorrt_requested_where_it_cannot_run_says_why_and_names_the_engine() -> None:
    bundle = Bundle(ENGINES / "dbt-detector")
    with pytest.raises(ConfigError) as refused:
        select_backend(bundle, "tensorrt")
    (problem,) = refused.value.problems
    assert problem.startswith("engine dbt-detector: backend tensorrt is configured")
    assert "tensorrt is not installed" in problem or "no CUDA GPU" in problem


def test_onnxruntime_backend_refuses_a_manifest_naming_a_tensor_the_model_lacks(
    tmp_path: Path,
) -> None:
    folder = copy_bundle(tmp_path)
    manifest = folder / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("input: image", "input: pixels"))
    with pytest.raises(ConfigError) as refused:
        OnnxRuntimeBackend(Bundle(folder))
    assert refused.value.problems == [
        f"{manifest}: model.input is 'pixels', but model.onnx has inputs ['image']"
    ]


# --- plans (the bookkeeping runs without a GPU) --------------------------------------------------


@needs_no_tensorrt
def test_cadnode_train_build_says_why_it_wrote_no_plan(tmp_path: Path) -> None:
    folder = copy_bundle(tmp_path)
    said = plan_for_bundle(Bundle(folder))
    assert said.startswith("TensorRT plan skipped: ")
    assert "not installed" in said or "no CUDA GPU" in said
    assert not list(folder.glob("*.plan"))


def test_a_plan_is_named_for_the_gpu_architecture_and_the_tensorrt_version() -> None:
    bundle = Bundle(ENGINES / "cxr-ruleout")
    l4, a100 = Gpu("NVIDIA L4", 8, 9), Gpu("NVIDIA A100", 8, 0)
    assert plan_name(bundle, "10.5.0.18", l4) == "model.sm89.trt10.5.0.18.plan"
    assert plan_name(bundle, "10.5.0.18", a100) == "model.sm80.trt10.5.0.18.plan"
    assert plan_name(bundle, "10.6.0.26", l4) == "model.sm89.trt10.6.0.26.plan"


def test_a_plan_runs_only_while_its_sidecar_vouches_for_it(tmp_path: Path) -> None:
    bundle = Bundle(copy_bundle(tmp_path))
    plan = PlanFile(bundle.folder / "model.sm89.trt10.5.0.18.plan")
    assert plan.valid_for(bundle, max_batch=8) == "no plan yet"
    plan.path.write_bytes(b"serialised engine")
    record = {"plan_sha256": sha256_of(plan.path), "onnx_sha256": bundle.sha256, "max_batch": 8}
    plan.sidecar.write_text(json.dumps(record))
    assert plan.valid_for(bundle, max_batch=8) is None
    assert "batches of 8, not 16" in str(plan.valid_for(bundle, max_batch=16))
    plan.sidecar.write_text(json.dumps({**record, "onnx_sha256": "0" * 64}))
    assert "built from another model.onnx" in str(plan.valid_for(bundle, max_batch=8))
    plan.sidecar.write_text(json.dumps(record))
    plan.path.write_bytes(b"serialised engine, altered")
    assert "does not match the SHA-256" in str(plan.valid_for(bundle, max_batch=8))


def test_tensorrt_plan_built_from_the_shipped_onnx_agrees_with_onnxruntime(
    tmp_path: Path,
) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (the `gpu` extra)")
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from cadnode.infer.backends import TensorRTBackend, import_cudart, local_gpu

    try:
        gpu = local_gpu(import_cudart())
    except Unusable as reason:
        pytest.skip(str(reason))
    bundle = Bundle(copy_bundle(tmp_path))
    films = sample_images(bundle.manifest) * 3  # 6 films: chunks of 4 and 2
    batch = np.concatenate([model_input(bundle.manifest, film, DEFAULT_LIMIT) for film in films])
    expected = OnnxRuntimeBackend(bundle).run(batch)

    backend = TensorRTBackend(bundle, max_batch=4)
    assert backend.plan.path.parent == bundle.folder
    assert gpu.arch in backend.plan.path.name
    assert backend.plan.valid_for(bundle, max_batch=4) is None
    actual = backend.run(batch)
    assert actual.shape == expected.shape
    assert float(np.abs(actual - expected).max()) <= TENSORRT_TOLERANCE
    built = backend.plan.path.stat().st_mtime_ns
    backend.close()

    again = TensorRTBackend(bundle, max_batch=4)  # the cached plan, not a new build
    assert again.plan.path.stat().st_mtime_ns == built
    again.close()


# --- the commands ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "output", "fault"),
    [
        ("cxr-ruleout", np.array([0.2, np.nan]), "1 non-finite value(s)"),
        ("cxr-ruleout", np.array([0.2, 1.5]), "probabilities outside [0, 1]: 0.2 .. 1.5"),
        ("cxr-ruleout", np.zeros((2, 1)), "output shape (2, 1), expected (2)"),
        ("cxr-segmenter", np.zeros((2, 2, 128, 128)), "expected (2, 3, 128, 128)"),
        ("dbt-detector", np.full((2, 64, 5), -0.5), "probabilities outside [0, 1]"),
        ("dbt-detector", np.zeros((2, 64, 4)), "expected (2, N, 5)"),
    ],
)
def test_verify_faults_an_output_of_the_wrong_shape_or_values(
    engine: str, output: np.ndarray, fault: str
) -> None:
    manifest = Bundle(ENGINES / engine).manifest
    with pytest.raises(SampleFault, match=re.escape(fault)):
        check_output(manifest, output, 2)


def test_engines_list_info_and_verify_on_the_shipped_bundles(tmp_path: Path) -> None:
    listed = cadnode("engines", "list", engines=ENGINES, data=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for name in NAMES:
        assert name in listed.stdout
    backend = decide("auto").backend
    assert listed.stdout.count(backend) == len(NAMES)

    info = cadnode("engines", "info", "cxr-ruleout", engines=ENGINES, data=tmp_path)
    assert info.returncode == 0, info.stderr
    rule_out = Bundle(ENGINES / "cxr-ruleout").manifest.operating_points["rule_out"]
    for expected in (
        "SCT 263654008 'Abnormal'",
        f"rule_out: threshold {rule_out.threshold:.4f}; sensitivity {rule_out.sensitivity:.4f}",
        "modalities: CR, DX",
        "training data: Synthetic chest radiograph phantoms",
        "MODEL_CARD.md",
    ):
        assert expected in info.stdout

    verified = cadnode("engines", "verify", engines=ENGINES, data=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for name in NAMES:
        assert f"OK    {name}:" in verified.stdout
    assert "FAULT" not in verified.stdout


def test_engines_verify_names_a_tampered_model_and_a_manifest_with_an_unknown_key(
    tmp_path: Path,
) -> None:
    tampered = copy_bundle(tmp_path, "cxr-ruleout") / "model.onnx"
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    manifest = copy_bundle(tmp_path, "dbt-detector") / "manifest.yaml"
    lines = manifest.read_text().splitlines(keepends=True)
    lines.insert(4, "colour: blue\n")  # line 5
    manifest.write_text("".join(lines))
    copy_bundle(tmp_path, "cxr-segmenter")

    verified = cadnode("engines", "verify", engines=tmp_path / "engines", data=tmp_path)
    assert verified.returncode == 1
    out = verified.stdout
    assert "FAULT cxr-ruleout:" in out
    assert "model.sha256 does not match model.onnx" in out
    assert f"FAULT dbt-detector: {manifest}:5:1: colour: Extra inputs are not permitted" in out
    assert "OK    cxr-segmenter:" in out

    one = cadnode("engines", "verify", "cxr-segmenter", engines=tmp_path / "engines", data=tmp_path)
    assert one.returncode == 0, one.stdout
    listed = cadnode("engines", "list", engines=tmp_path / "engines", data=tmp_path)
    assert listed.returncode == 1
    assert "cxr-ruleout      FAULT:" in listed.stdout


@needs_no_tensorrt
def test_engines_verify_with_tensorrt_configured_here_faults_with_the_reason(
    tmp_path: Path,
) -> None:
    config = tmp_path / "cadnode.yaml"
    config.write_text(
        "engines:\n  backend: onnxruntime\n  options:\n    cxr-ruleout:\n      backend: tensorrt\n"
    )
    verified = cadnode("engines", "verify", engines=ENGINES, data=tmp_path, config=config)
    assert verified.returncode == 1
    refused = "FAULT cxr-ruleout: engine cxr-ruleout: backend tensorrt is configured"
    assert refused in verified.stdout
    assert "OK    dbt-detector:" in verified.stdout
