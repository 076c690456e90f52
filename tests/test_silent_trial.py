"""A silent trial on real peers: a second version of the rule-out engine, built by
cadnode-train (tiny config, another seed, version 0.2.0) and installed beside the shipped one,
runs in shadow on every film DCMTK pushes to `cadnode serve`; its answers are stored
(Result.shadow) and nothing of it reaches Orthanc or the worklist. `cadnode engines promote`
makes it the version whose results are delivered, `rollback` puts 0.1.0 back, and no job is
ever processed twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import col, select

from cadnode.core.db import (
    Database,
    Job,
    Result,
    ShadowRun,
    ShadowRunState,
    Study,
    StudyPriority,
)
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.peers import REPO, Cadnode, Orthanc, run_cadnode, run_orthanc, storescu, wait_for
from training.cli import main as train

NAME = "cxr-ruleout"
TINY = REPO / "training" / "configs" / "ruleout-tiny.yaml"
SHIPPED = "0.1.0"
PATIENCE_S = 180
FILMS = 3  # per round
# The shipped chest rule's engines that are installed here: no step pins a version, so the
# release table decides (cadnode/infer/releases.py).
RULES = """\
rules:
  - name: chest-radiograph
    match: {Modality: [CR, DX], BodyPartExamined: CHEST, ViewPosition: [PA, AP]}
    action: infer
    pipeline:
      - cxr-ruleout
      - engine: cxr-segmenter
        when: {step: cxr-ruleout, ruled_out: false}
    priority: urgent
  - name: everything-else
    action: ignore
"""


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped engines, and cxr-ruleout 0.2.0 trained with another seed beside them."""
    folder = tmp_path_factory.mktemp("engines")
    for shipped in (REPO / "engines").iterdir():
        if (shipped / "manifest.yaml").exists():
            (folder / shipped.name).symlink_to(shipped)
    out = folder / f"{NAME}-0.2.0"
    built = ["build", "ruleout", "--config", str(TINY), "--out", str(out)]
    assert train([*built, "--version", "0.2.0", "--seed", "11"]) == 0
    return folder


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, engines: Path, pacs: Orthanc
) -> Iterator[Cadnode]:
    folder = tmp_path_factory.mktemp("cadnode")
    config = folder / "cadnode.yaml"
    (folder / "rules.yaml").write_text(RULES)
    config.write_text(json.dumps({"engines": {"dir": str(engines)}, "rules": "rules.yaml"}))
    env = {
        **os.environ,
        "CADNODE_DATA_DIR": str(folder / "var"),
        "CADNODE_CONFIG": str(config),
    }
    # Both versions installed before the first start: 0.2.0, the highest, would be live by
    # default; the admin puts it in shadow first (docs/silent-trial.md).
    shadow = cli(env, "engines", "shadow", NAME, "0.2.0")
    assert shadow.returncode == 0, shadow.stderr
    with run_cadnode(folder, pacs.destination, CADNODE_CONFIG=str(config)) as cadnode:
        yield cadnode


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cadnode.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )


def push_films(node: Cadnode, folder: Path, first_seed: int) -> list[str]:
    """FILMS frontal chest films, each its own study, pushed with storescu; their study UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, studies = [], []
    for seed in range(first_seed, first_seed + FILMS):
        path = folder / f"{seed}.dcm"
        studies.append(str(write_chest_radiograph(path, seed=seed, size=128).StudyInstanceUID))
        paths.append(path)
    done = storescu(node.dicom_port, *paths)
    assert done.returncode == 0, done.stderr
    return studies


def settled(database: Database, studies: list[str]) -> list[Job]:
    """The studies' jobs once each is delivered and its shadow runs have ended."""
    with database.session() as session:
        jobs = session.exec(select(Job).join(Study).where(col(Study.study_uid).in_(studies))).all()
        if len(jobs) != len(studies) or any(job.state != "delivered" for job in jobs):
            return []
        runs = session.exec(
            select(ShadowRun).where(col(ShadowRun.job_id).in_([job.id for job in jobs]))
        ).all()
        if len(runs) != len(jobs) or any(
            run.state not in (ShadowRunState.done, ShadowRunState.failed) for run in runs
        ):
            return []
        return list(jobs)


def results(database: Database, jobs: list[Job]) -> list[Result]:
    with database.session() as session:
        ids = [job.id for job in jobs]
        return list(session.exec(select(Result).where(col(Result.job_id).in_(ids))).all())


def delivered_versions(pacs: Orthanc, studies: list[str]) -> Counter[str]:
    """The versions of cxr-ruleout credited in the SRs Orthanc holds for the studies."""
    found: Counter[str] = Counter()
    for study in studies:
        for orthanc_id in pacs.instances_of_study(study):
            tags = pacs.instance_tags(orthanc_id)
            if tags.get("Modality") != "SR":
                continue
            for entry in tags.get("ContributingEquipmentSequence", []):
                if entry.get("ManufacturerModelName") == NAME:
                    found[entry.get("SoftwareVersions")] += 1
    return found


def run_round(
    node: Cadnode, pacs: Orthanc, database: Database, folder: Path, seed: int
) -> tuple[list[str], list[Job], list[Result]]:
    studies = push_films(node, folder, seed)
    jobs = wait_for(lambda: settled(database, studies), PATIENCE_S, "jobs delivered, shadows run")
    return studies, jobs, results(database, jobs)


def check_round(
    pacs: Orthanc, studies: list[str], jobs: list[Job], found: list[Result], live: str, shadow: str
) -> None:
    ruleout = [r for r in found if r.engine == NAME]
    per_job = {(r.job_id, r.engine_version, r.shadow) for r in ruleout}
    # Each film answered once by the live version and once, apart, by the shadow one.
    assert per_job == {(j.id, live, False) for j in jobs} | {(j.id, shadow, True) for j in jobs}
    assert len(ruleout) == 2 * len(jobs)
    # Orthanc holds one rule-out SR per study, from the live version only.
    versions = wait_for(
        lambda: (v := delivered_versions(pacs, studies)) and sum(v.values()) >= len(studies) and v,
        PATIENCE_S,
        "the rule-out SRs in Orthanc",
    )
    assert versions == Counter({live: len(studies)})


def test_shadow_runs_on_every_film_and_promotion_and_rollback_change_what_is_delivered(
    node: Cadnode, pacs: Orthanc, tmp_path: Path
) -> None:
    database = Database(node.data_dir / "cadnode.db")
    listed = node.cli("engines", "list")
    assert listed.returncode == 0, listed.stderr
    roles = {tuple(line.split()[:3]) for line in listed.stdout.splitlines()}
    assert {(NAME, SHIPPED, "live"), (NAME, "0.2.0", "shadow")} <= roles

    studies, jobs, found = run_round(node, pacs, database, tmp_path / "first", 100)
    check_round(pacs, studies, jobs, found, live=SHIPPED, shadow="0.2.0")
    with database.session() as session:  # the worklist: one decision per job, from live answers
        decided = Counter(
            p.job_id
            for p in session.exec(select(StudyPriority)).all()
            if p.job_id in {job.id for job in jobs}
        )
    assert set(decided.values()) == {1}

    compared = node.cli("engines", "compare", NAME, "--since", "1d")
    assert compared.returncode == 0, compared.stderr
    assert f"live {SHIPPED} vs shadow 0.2.0" in compared.stdout
    assert f"{FILMS} image(s) answered by both" in compared.stdout
    print(compared.stdout)  # shown with -s: a comparison from a real run

    promoted = node.cli("engines", "promote", NAME, "0.2.0", "--yes", "--since", "1d")
    assert promoted.returncode == 0, promoted.stderr
    assert compared.stdout.splitlines()[0] in promoted.stdout  # shown before it acts
    studies, jobs, found = run_round(node, pacs, database, tmp_path / "second", 200)
    check_round(pacs, studies, jobs, found, live="0.2.0", shadow=SHIPPED)

    rolled = node.cli("engines", "rollback", NAME, "--yes")
    assert rolled.returncode == 0, rolled.stderr
    studies, jobs, found = run_round(node, pacs, database, tmp_path / "third", 300)
    check_round(pacs, studies, jobs, found, live=SHIPPED, shadow="0.2.0")

    # No job processed twice: one answer per job, image, engine and version, one attempt each.
    with database.session() as session:
        all_results = session.exec(select(Result)).all()
        attempts = {job.attempts for job in session.exec(select(Job)).all()}
    keys = Counter((r.job_id, r.sop_instance_uid, r.engine, r.engine_version) for r in all_results)
    assert set(keys.values()) == {1}
    assert attempts == {1}
