"""The infer stage takes routed jobs most urgent first, choosing again after each job."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

from pydicom import Dataset
from sqlmodel import select

from cadnode.core.config import LimitsSettings
from cadnode.core.db import Database, Instance, Job, JobState, PriorityClass, utcnow
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.infer.answers import DetectAnswer, parse_answer
from cadnode.infer.bundle import Bundle
from cadnode.infer.phantoms.breast import write_tomosynthesis
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.infer.runtime import Engine, load_engines
from cadnode.infer.stage import Inference
from cadnode.route import LiveRules, Router
from tests import infer_jobs
from tests.infer_jobs import Gated
from tests.peers import REPO, wait_for
from tests.rows import instance_row, job_of, new_job, results_of


def arriving_job(
    database: Database, spool: Path, seed: int, ds: Dataset | None = None, path: Path | None = None
) -> int:
    """A job still receiving its study (state received), its first image stored."""
    path = path or spool / f"{seed}.dcm"
    ds = ds or write_chest_radiograph(path, seed=seed, size=64)
    with database.session() as session:
        job = new_job(session, str(ds.StudyInstanceUID), instance_count=1)
        session.add(instance_row(ds, str(path.relative_to(spool)), job))
        session.commit()
        assert job.id is not None
        return job.id


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def routed_job(database: Database, spool: Path, seed: int, priority: PriorityClass) -> int:
    path = spool / f"{seed}.dcm"
    ds = write_chest_radiograph(path, seed=seed, size=128)
    return infer_jobs.routed_job(database, spool, ds, path, priority=priority)


def test_urgent_work_overtakes_routine_and_background_work_queued_before_it(
    database: Database, tmp_path: Path
) -> None:
    engines = {
        name: e
        for name, e in load_engines(REPO / "engines", limits=LimitsSettings()).items()
        if e.name == "cxr-ruleout"  # keyed by name@version
    }
    background = routed_job(database, tmp_path, 1, PriorityClass.background)
    routine = routed_job(database, tmp_path, 2, PriorityClass.routine)
    urgent = routed_job(database, tmp_path, 3, PriorityClass.urgent)

    Inference(database, tmp_path, engines).advance()

    with database.session() as session:
        jobs = session.exec(select(Job).order_by(Job.updated_at)).all()  # type: ignore[arg-type]
        assert [job.state for job in jobs] == [JobState.inferred] * 3
        assert [job.id for job in jobs] == [urgent, routine, background]


def test_an_urgent_film_overtakes_a_background_dbt_volume_in_its_engine_call(
    database: Database, tmp_path: Path
) -> None:
    """The chest film runs on its own engine's workers while the volume's call is still in
    progress: it waits for no queue, not even the call in progress."""
    detector = Gated(Bundle(REPO / "engines" / "dbt-detector"))
    ruleout = Engine(Bundle(REPO / "engines" / "cxr-ruleout"), max_decoded_bytes=DEFAULT_LIMIT)
    engines = {"dbt-detector": detector, "cxr-ruleout": ruleout}
    path = tmp_path / "volume.dcm"
    volume, _ = write_tomosynthesis(path, seed=28, view="LMLO", masses=1)
    dbt = infer_jobs.routed_job(
        database,
        tmp_path,
        volume,
        path,
        pipeline=[{"engine": "dbt-detector"}],
        priority=PriorityClass.background,
    )
    stage = Inference(database, tmp_path, engines)
    worker = threading.Thread(target=stage.advance)
    worker.start()
    try:
        wait_for(detector.started.is_set, 30, "the volume's engine call to start")
        urgent = routed_job(database, tmp_path, 7, PriorityClass.urgent)
        wait_for(lambda: job_of(database, urgent).state is JobState.inferred, 30, "the film")
        assert job_of(database, dbt).state is JobState.routed  # its call is still in progress
    finally:
        detector.gate.set()
        worker.join(60)
    assert job_of(database, dbt).state is JobState.inferred
    [result] = results_of(database, dbt)
    answer = parse_answer(result.answer)
    assert isinstance(answer, DetectAnswer) and answer.frames == 16


def test_the_rule_matching_a_study_s_first_image_sets_its_quiet_period(
    database: Database, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: chest\n    match: {Modality: DX}\n    action: infer\n"
        "    pipeline: [cxr-ruleout]\n    quiet_period_s: 0.5\n"
        "  - name: rest\n    action: ignore\n"
    )
    router = Router(database, tmp_path, LiveRules(rules, ["cxr-ruleout"]))
    chest = arriving_job(database, tmp_path, 4)
    other = write_chest_radiograph(tmp_path / "ct.dcm", seed=5, size=64)
    other.Modality = "CT"
    other.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    ct = arriving_job(database, tmp_path, 5, other, tmp_path / "ct.dcm")
    woken: list[bool] = []
    database.on_change = lambda: woken.append(True)
    before = utcnow()

    router.advance()  # route records it on the job, where assemble reads it

    for job_id, expected in ((chest, 0.5), (ct, None)):  # "rest" sets none: the default
        job = job_of(database, job_id)
        assert job.state is JobState.received  # still arriving: recorded, not routed
        assert job.quiet_period_s == expected
        assert job.quiet_period_decided_at is not None
        assert _aware(job.quiet_period_decided_at) >= before
    assert woken  # assemble is woken to read them
    # Decided once per job: the first header is not read again (not even changed).
    with database.session() as session:
        row = session.exec(select(Instance).where(Instance.job_id == chest)).one()
        row.path = "ct.dcm"
        session.add(row)
        session.commit()
    woken.clear()
    router.advance()
    assert job_of(database, chest).quiet_period_s == 0.5 and not woken
