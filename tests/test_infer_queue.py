"""The infer stage takes routed jobs most urgent first, choosing again after each job."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import select

from cadnode.db import Database, Instance, Job, JobState, PriorityClass, Study
from cadnode.infer.runtime import load_engines
from cadnode.infer.stage import Inference
from cadnode.route import LiveRules, Router
from tests.peers import REPO
from training.phantoms import write_chest_radiograph


def routed_job(database: Database, spool: Path, seed: int, priority: PriorityClass) -> int:
    ds = write_chest_radiograph(spool / f"{seed}.dcm", seed=seed, size=128)
    with database.session() as session:
        study = Study(study_uid=str(ds.StudyInstanceUID))
        session.add(study)
        session.flush()
        assert study.id is not None
        job = Job(
            study_id=study.id,
            version=1,
            state=JobState.routed,
            priority=priority,
            pipeline=[{"engine": "cxr-ruleout"}],
            inputs=[str(ds.SOPInstanceUID)],
            instance_count=1,
        )
        session.add(job)
        session.flush()
        assert job.id is not None
        session.add(
            Instance(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=ds.SOPClassUID,
                series_uid=ds.SeriesInstanceUID,
                transfer_syntax="1.2.840.10008.1.2.1",
                path=f"{seed}.dcm",
                size=1,
                calling_ae="A",
                peer="127.0.0.1:1",
                job_id=job.id,
            )
        )
        session.commit()
        return job.id


def test_urgent_work_overtakes_routine_and_background_work_queued_before_it(
    database: Database, tmp_path: Path
) -> None:
    engines = {
        name: e for name, e in load_engines(REPO / "engines").items() if name == "cxr-ruleout"
    }
    background = routed_job(database, tmp_path, 1, PriorityClass.background)
    routine = routed_job(database, tmp_path, 2, PriorityClass.routine)
    urgent = routed_job(database, tmp_path, 3, PriorityClass.urgent)

    Inference(database, tmp_path, engines).advance()

    with database.session() as session:
        jobs = session.exec(select(Job).order_by(Job.updated_at)).all()  # type: ignore[arg-type]
        assert [job.state for job in jobs] == [JobState.inferred] * 3
        assert [job.id for job in jobs] == [urgent, routine, background]


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
    chest = routed_job(database, tmp_path, 4, PriorityClass.routine)
    with database.session() as session:
        job = session.get(Job, chest)
        assert job is not None
        assert router.quiet_period_for(session, job) == 0.5
        instance = session.exec(select(Instance).where(Instance.job_id == chest)).one()
        other = write_chest_radiograph(tmp_path / "ct.dcm", seed=5, size=64)
        other.Modality = "CT"
        other.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
        instance.path = "ct.dcm"
        session.add(instance)
        session.commit()
        fresh = Router(database, tmp_path, LiveRules(rules, ["cxr-ruleout"]))
        assert fresh.quiet_period_for(session, job) is None  # "rest" sets none: the default
