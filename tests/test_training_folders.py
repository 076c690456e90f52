"""Training from dataset folders: each layout indexed, split by patient, streamed from disk
through a DataLoader, built into a verified bundle; resume reproduces an uninterrupted run;
memory stays flat when the dataset doubles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cadnode.core.config import EngineSettings, LimitsSettings
from cadnode.infer import catalogue
from training.builds import trained_ruleout
from training.cli import main
from training.records import Record, index_folder, split_records
from training.sources import Source
from training.streaming import METRICS_CSV, RunOptions

REPOSITORY = Path(__file__).resolve().parent.parent
CONFIG = """name: cxr-ruleout
version: 0.0.0-test
seed: 7
threads: 1
phantom_size: 64
input_size: 32
splits:
  train: {count: 16, first_seed: 1000}
  validation: {count: 8, first_seed: 2000}
  test: {count: 8, first_seed: 3000}
model:
  channels: [4, 8]
training:
  epochs: 2
  batch_size: 4
  learning_rate: 0.01
  augment: true
date: "2026-01-01"
"""


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def chest_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chest")
    argv = ["phantoms", "--kind", "cxr", "--count", "30", "--out", str(out / "data")]
    assert main([*argv, "--size", "64", "--seed", "5000"]) == 0
    (out / "tiny.yaml").write_text(CONFIG)
    return out


LAYOUT_FOLDERS = {
    "rsna": "data",
    "siim": "data",
    "cxrlt": "data",
    "folder": "data",
    "montgomery": "data/montgomery",
    "shenzhen": "data/shenzhen",
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_FOLDERS))
def test_ruleout_builds_from_each_layout(chest_folder: Path, layout: str) -> None:
    engines = chest_folder / f"engines-{layout}"
    run = chest_folder / f"run-{layout}"
    argv = ["build", "ruleout", "--config", str(chest_folder / "tiny.yaml")]
    argv += ["--data", str(chest_folder / LAYOUT_FOLDERS[layout]), "--layout", layout]
    argv += ["--out", str(engines / "cxr-ruleout"), "--workers", "1", "--run-dir", str(run)]
    assert main([*argv, "--validation", "0.2", "--test", "0.2"]) == 0
    said: list[str] = []
    settings = EngineSettings(dir=engines, backend="onnxruntime")
    assert catalogue.verify(settings, limits=LimitsSettings(), say=said.append) == 0, said
    card = (engines / "cxr-ruleout" / "MODEL_CARD.md").read_text()
    assert f"--layout {layout}" in card and f"The {layout} dataset layout" in card
    lines = (run / METRICS_CSV).read_text().splitlines()
    assert lines[0] == "epoch,loss,lr,validation_auc" and len(lines) == 3
    assert any((run / "tensorboard").iterdir())


def test_splits_keep_patients_together_and_stratify(chest_folder: Path) -> None:
    records = index_folder(chest_folder / "data", "rsna")
    # Two films per patient: the split must never separate them.
    doubled = records + [Record(f"{r.key}-b", r.patient, r.image, r.labels) for r in records]
    splits = split_records(doubled, validation=0.2, test=0.2, seed=1)
    patients = [{r.patient for r in part} for part in splits.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    for part in splits.values():
        assert any(r.abnormal for r in part) and not all(r.abnormal for r in part)
    folds = [
        split_records(records, validation=0, test=0, seed=1, folds=3, fold=i) for i in range(3)
    ]
    tested = [{r.key for r in f["test"]} for f in folds]
    assert set().union(*tested) == {r.key for r in records}
    assert sum(len(t) for t in tested) == len(records)  # each record tested exactly once


def test_bad_folder_is_named(chest_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("dicom_id,subject_id,Pneumothorax\nnope,1,1\n")
    with pytest.raises(ValueError, match=r"train\.csv:2: no image for dicom_id nope"):
        index_folder(tmp_path, "cxrlt")
    assert main(["build", "ruleout", "--data", str(tmp_path), "--layout", "duke"]) == 2


def test_resume_gives_the_uninterrupted_weights(chest_folder: Path, tmp_path: Path) -> None:
    config = chest_folder / "tiny.yaml"

    def weights(run: RunOptions) -> dict[str, torch.Tensor]:
        source = Source(
            data=chest_folder / "data", layout="rsna", validation=0.2, test=0.2, run=run
        )
        return trained_ruleout(config, None, source)[-1].state_dict()

    whole = weights(RunOptions(run_dir=tmp_path / "whole", workers=0))
    weights(RunOptions(run_dir=tmp_path / "cut", workers=0, stop_after=1))
    assert len((tmp_path / "cut" / METRICS_CSV).read_text().splitlines()) == 2  # one epoch
    resumed = weights(RunOptions(run_dir=tmp_path / "cut", workers=0, resume=True))
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name
    assert (tmp_path / "cut" / METRICS_CSV).read_text() == (
        tmp_path / "whole" / METRICS_CSV
    ).read_text()


PEAK = """
import json, resource, sys
import torch
torch.set_num_threads(1)
from pathlib import Path
from training.builds import trained_ruleout
from training.sources import Source
from training.streaming import RunOptions
config, data = Path(sys.argv[1]), Path(sys.argv[2])
source = Source(data=data, layout="cxrlt", validation=0.2, test=0.2, run=RunOptions(workers=0))
trained_ruleout(config, None, source)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def test_memory_stays_flat_when_the_dataset_doubles(tmp_path: Path) -> None:
    """Peak RSS of a training process (ru_maxrss) on N films and on 2N films."""
    peaks = []
    (tmp_path / "tiny.yaml").write_text(CONFIG.replace("input_size: 32", "input_size: 64"))
    for count in (32, 64):
        data = tmp_path / f"films-{count}"
        argv = ["phantoms", "--kind", "cxr", "--count", str(count), "--out", str(data)]
        assert main([*argv, "--size", "128"]) == 0
        done = subprocess.run(
            [sys.executable, "-c", PEAK, str(tmp_path / "tiny.yaml"), str(data)],
            capture_output=True,
            text=True,
            check=False,
            cwd=REPOSITORY,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        peaks.append(json.loads(done.stdout.splitlines()[-1]))
    assert peaks[1] <= 1.2 * peaks[0], peaks
