"""Engine versions side by side: the release table (live, shadow, retired), promotion and
rollback in one audited transaction, duplicate installs refused, pinned versions in rules,
route writing the versions into the pipeline, and the infer stage's shadow runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlmodel import col, select

from cadnode.core.config import LimitsSettings
from cadnode.core.db import (
    AuditEvent,
    AuditKind,
    Database,
    EngineRelease,
    Job,
    JobState,
    PriorityClass,
    ReleaseRole,
    Result,
    ShadowRun,
    ShadowRunState,
)
from cadnode.core.yamlfile import ConfigError
from cadnode.infer import releases
from cadnode.infer.bundle import discover, discover_versions, version_order
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.infer.runtime import load_engines
from cadnode.infer.stage import Inference
from cadnode.route.rules import load_rules
from cadnode.route.stage import Router
from cadnode.route.steps import Step
from tests import infer_jobs
from tests.peers import REPO

NAME = "cxr-ruleout"
BOTH = ["0.1.0", "0.2.0"]


def second_version(engines: Path, version: str = "0.2.0") -> Path:
    """The shipped rule-out bundle copied under another version: same model, same hash."""
    folder = engines / f"{NAME}-{version}"
    shutil.copytree(REPO / "engines" / NAME, folder)
    manifest = folder / "manifest.yaml"
    text = manifest.read_text()
    shipped = Path(REPO / "engines" / NAME / "manifest.yaml").read_text()
    old = next(line for line in shipped.splitlines() if line.startswith("version:"))
    manifest.write_text(text.replace(old, f"version: {version}", 1))
    return folder


def rows(database: Database) -> dict[str, ReleaseRole]:
    with database.session() as session:
        found = session.exec(select(EngineRelease).where(EngineRelease.name == NAME))
        return {row.version: row.role for row in found}


def live_and_shadow(database: Database, installed: list[str]) -> tuple[str | None, tuple[str, ...]]:
    with database.session() as session:
        release = releases.resolve(session, NAME, installed)
    return release.live, release.shadows


# --- versions on disk ------------------------------------------------------------------------


def test_versions_order_numerically_not_as_text() -> None:
    assert version_order("0.10.0") > version_order("0.9.0")
    assert version_order("1.0.0") > version_order("0.99.1")
    assert max(["0.1.0", "0.2.0", "0.0.0-test"], key=version_order) == "0.2.0"


def test_two_folders_with_the_same_name_and_version_are_refused_naming_both(
    tmp_path: Path,
) -> None:
    shutil.copytree(REPO / "engines" / NAME, tmp_path / "a")
    shutil.copytree(REPO / "engines" / NAME, tmp_path / "b")
    with pytest.raises(ConfigError) as refused:
        discover_versions(tmp_path)
    (problem,) = refused.value.problems
    assert str(tmp_path / "a") in problem and str(tmp_path / "b") in problem
    assert "installed twice" in problem


def test_two_versions_load_side_by_side_and_the_highest_is_the_default(tmp_path: Path) -> None:
    shutil.copytree(REPO / "engines" / NAME, tmp_path / NAME)
    second_version(tmp_path)
    assert sorted(discover_versions(tmp_path)) == [(NAME, "0.1.0"), (NAME, "0.2.0")]
    assert discover(tmp_path)[NAME].manifest.version == "0.2.0"


# --- the release table -----------------------------------------------------------------------


def test_with_nothing_recorded_the_highest_installed_version_is_live(database: Database) -> None:
    assert live_and_shadow(database, BOTH) == ("0.2.0", ())
    assert live_and_shadow(database, ["0.1.0"]) == ("0.1.0", ())


def test_a_version_installed_after_the_first_start_does_not_go_live_by_itself(
    database: Database,
) -> None:
    releases.record_defaults(database, {NAME: ["0.1.0"]})
    releases.record_defaults(database, {NAME: BOTH})  # the next start, 0.2.0 installed
    assert live_and_shadow(database, BOTH) == ("0.1.0", ())
    with database.session() as session:
        assert releases.roles(session, NAME, BOTH) == {"0.1.0": "live", "0.2.0": "installed"}


def test_shadow_then_promote_then_rollback(database: Database) -> None:
    releases.record_defaults(database, {NAME: ["0.1.0"]})
    releases.set_role(database, NAME, "0.2.0", ReleaseRole.shadow, BOTH)
    assert live_and_shadow(database, BOTH) == ("0.1.0", ("0.2.0",))

    after = releases.promote(database, NAME, "0.2.0", BOTH, actor="admin")
    assert (after.live, after.shadows) == ("0.2.0", ("0.1.0",))
    assert rows(database) == {"0.1.0": ReleaseRole.shadow, "0.2.0": ReleaseRole.live}

    back = releases.rollback(database, NAME, BOTH, retire=True)
    assert (back.live, back.shadows) == ("0.1.0", ())
    assert rows(database) == {"0.1.0": ReleaseRole.live, "0.2.0": ReleaseRole.retired}
    # Rolling back again puts back 0.2.0: the latest to stop being live.
    assert releases.rollback(database, NAME, BOTH).live == "0.2.0"


def test_each_change_is_audited_with_before_and_after(database: Database) -> None:
    releases.set_role(database, NAME, "0.2.0", ReleaseRole.shadow, BOTH)  # 0.2.0 was default
    releases.promote(database, NAME, "0.2.0", BOTH, actor="admin")
    with database.session() as session:
        events = session.exec(
            select(AuditEvent)
            .where(AuditEvent.kind == AuditKind.admin_engine_release)
            .order_by(col(AuditEvent.id))
        ).all()
    assert [(e.details["action"], e.details["live_before"], e.details["live"]) for e in events] == [
        ("shadow", "0.2.0", "0.1.0"),
        ("promote", "0.1.0", "0.2.0"),
    ]
    assert events[-1].actor == "admin" and events[-1].details["shadow"] == ["0.1.0"]


def test_a_change_that_fails_part_way_leaves_nothing_of_itself(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    releases.record_defaults(database, {NAME: ["0.1.0"]})
    releases.set_role(database, NAME, "0.2.0", ReleaseRole.shadow, BOTH)
    before = rows(database)

    def audit_fails(**_: object) -> None:
        raise RuntimeError("the audit row could not be made")

    monkeypatch.setattr(releases, "AuditEvent", audit_fails)
    with pytest.raises(RuntimeError):
        releases.promote(database, NAME, "0.2.0", BOTH)
    assert rows(database) == before  # the roles changed in the same transaction: undone
    assert live_and_shadow(database, BOTH) == ("0.1.0", ("0.2.0",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda db: releases.promote(db, NAME, "0.3.0", BOTH), "0.3.0 is not installed"),
        (lambda db: releases.promote(db, NAME, "0.1.0", BOTH), "is live already"),
        (lambda db: releases.rollback(db, NAME, BOTH), "no earlier live version"),
        (
            lambda db: releases.set_role(db, NAME, "0.1.0", ReleaseRole.retired, BOTH),
            "is live: promote another version first",
        ),
    ],
)
def test_refused_changes_say_why_and_change_nothing(
    database: Database, change: object, message: str
) -> None:
    releases.record_defaults(database, {NAME: ["0.1.0"]})
    before = rows(database)
    with pytest.raises(releases.ReleaseError, match=message):
        change(database)  # type: ignore[operator]
    assert rows(database) == before


# --- rules and route -------------------------------------------------------------------------

PINNED = """\
rules:
  - name: chest
    match: {{Modality: CR}}
    action: infer
    pipeline:
      - engine: cxr-ruleout
        version: {version}
        shadow: [{shadow}]
"""


@pytest.mark.parametrize(
    ("version", "shadow", "problem"),
    [
        ("0.3.0", "0.2.0", "cxr-ruleout 0.3.0 is not installed (0.1.0, 0.2.0)"),
        ("0.1.0", "0.4.0", "cxr-ruleout 0.4.0 is not installed"),
        ("0.1.0", "0.1.0", "0.1.0 is this step's live version"),
    ],
)
def test_a_rule_may_pin_only_installed_versions(
    tmp_path: Path, version: str, shadow: str, problem: str
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(PINNED.format(version=version, shadow=shadow))
    with pytest.raises(ConfigError) as refused:
        load_rules(path, [NAME], versions={NAME: BOTH})
    assert any(
        (problem in line and ":7:" in line) or ":8:" in line for line in refused.value.problems
    )
    assert any(problem in line for line in refused.value.problems)


def test_route_writes_the_versions_in_force_when_it_routes(
    database: Database, tmp_path: Path
) -> None:
    router = Router(database, tmp_path, None, versions={NAME: BOTH})  # type: ignore[arg-type]
    releases.record_defaults(database, {NAME: ["0.1.0"]})
    releases.set_role(database, NAME, "0.2.0", ReleaseRole.shadow, BOTH)
    plain, pinned = Step(engine=NAME), Step(engine=NAME, version="0.2.0", shadow=[])
    with database.session() as session:
        first = router._versioned(session, [plain, pinned])
    releases.promote(database, NAME, "0.2.0", BOTH)
    with database.session() as session:
        (later,) = router._versioned(session, [plain])
    assert [(s.version, s.shadow) for s in first] == [("0.1.0", ["0.2.0"]), ("0.2.0", [])]
    assert (later.version, later.shadow) == ("0.2.0", ["0.1.0"])


# --- the infer stage's shadow runs -----------------------------------------------------------


def test_a_shadow_run_answers_after_the_live_job_and_apart_from_it(
    database: Database, tmp_path: Path
) -> None:
    engines_dir = tmp_path / "engines"
    shutil.copytree(REPO / "engines" / NAME, engines_dir / NAME)
    second_version(engines_dir)
    engines = load_engines(engines_dir, limits=LimitsSettings())
    spool = tmp_path / "spool"
    jobs = []
    for seed in (1, 2):
        path = spool / f"{seed}.dcm"
        ds = write_chest_radiograph(path, seed=seed, size=128)
        pipeline = [{"engine": NAME, "version": "0.1.0", "shadow": ["0.2.0"]}]
        jobs.append(
            infer_jobs.routed_job(
                database, spool, ds, path, pipeline=pipeline, priority=PriorityClass.routine
            )
        )
    stage = Inference(database, spool, engines, answers=tmp_path / "answers")

    def shadow_done() -> bool:
        with database.session() as session:
            runs = session.exec(select(ShadowRun)).all()
            return len(runs) == 2 and all(r.state is ShadowRunState.done for r in runs)

    infer_jobs.run_until(stage, shadow_done, 60, "both shadow runs to end")
    with database.session() as session:
        states = [session.get(Job, job_id).state for job_id in jobs]  # type: ignore[union-attr]
        results = session.exec(select(Result).order_by(col(Result.id))).all()
    assert states == [JobState.inferred, JobState.inferred]
    by_kind = sorted((r.job_id, r.engine_version, r.shadow) for r in results)
    assert by_kind == [
        (jobs[0], "0.1.0", False),
        (jobs[0], "0.2.0", True),
        (jobs[1], "0.1.0", False),
        (jobs[1], "0.2.0", True),
    ]


def test_no_shadow_run_starts_while_a_live_job_waits(database: Database, tmp_path: Path) -> None:
    engines = load_engines(REPO / "engines", limits=LimitsSettings())
    engines = {key: e for key, e in engines.items() if e.name == NAME}
    spool = tmp_path / "spool"
    path = spool / "1.dcm"
    ds = write_chest_radiograph(path, seed=1, size=128)
    waiting = infer_jobs.routed_job(database, spool, ds, path)
    version = next(iter(engines.values())).manifest.version
    with database.session() as session:
        session.add(
            ShadowRun(job_id=waiting, engine=NAME, version=version, inputs=[ds.SOPInstanceUID])
        )
        session.commit()
    stage = Inference(database, spool, engines, answers=tmp_path / "answers")
    with database.session() as session:
        stage._start_shadow_runs(session)
        assert stage.running == 0  # the live job goes first
        job = session.get(Job, waiting)
        assert job is not None
        job.state = JobState.inferred
        session.add(job)
        session.commit()
        stage._start_shadow_runs(session)
        assert stage.running == 1
    stage.close()


# --- what the dashboard and the later stages see ---------------------------------------------


def test_the_dashboard_shows_shadow_answers_apart_from_the_results(
    database: Database,
) -> None:
    from cadnode.admin.data import job_rows
    from cadnode.infer.answers import dump_answer
    from cadnode.infer.bundle import Bundle
    from cadnode.infer.postprocess import classify_answer
    from tests.rows import new_job

    manifest = Bundle(REPO / "engines" / NAME).manifest
    with database.session() as session:
        job = new_job(session, "1.2.3", state=JobState.inferred)
        assert job.id is not None
        for version, shadow, p in (("0.1.0", False, 0.2), ("0.2.0", True, 0.9)):
            session.add(
                Result(
                    job_id=job.id,
                    engine=NAME,
                    engine_version=version,
                    model_sha256="0" * 64,
                    sop_instance_uid="1.2.3.4",
                    answer=dump_answer(classify_answer(manifest, p)),
                    shadow=shadow,
                )
            )
        session.commit()
        (row,) = job_rows(session, job_id=job.id)
    assert [(f.version, f.probability) for f in row.findings] == [("0.1.0", 0.2)]
    assert [(f.version, f.probability) for f in row.shadow_findings] == [("0.2.0", 0.9)]
