"""Film cost: the Python time one chest film costs the encode and prioritize stages.

The backlog benchmark (benchmarks/backlog.py) is CPU-bound on the stages' Python; this one
times those stages alone, in this process, on N normal phantom films (256x256 DX, as the
backlog pushes) on a fresh SQLite database, with no network peer:

- encode: N inferred single-film jobs, each with a rule-out answer, encoded by the stage
  (one SR each, written and indexed, its delivery queued);
- prioritize: the N studies' arrival decisions (each creates the study's UPS workitem),
  then their decisions on the settled jobs (each updates the workitem).

Prints milliseconds per film for each, of CPU time and of the wall clock. `--profile FILE`
also writes cProfile's statistics of each run (`FILE.arrival`, `FILE.results`, `FILE.encode`;
read them with `python -m pstats`).

    .venv/bin/python benchmarks/film_cost.py [--films 200] [--profile film]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlmodel import col, select

from cadnode.core.config import Destination, PrioritySettings
from cadnode.core.db import Database, Instance, Job, JobState, Result, Study
from cadnode.dicom.pixels import DEFAULT_LIMIT
from cadnode.encode.stage import Encoder
from cadnode.infer.answers import dump_answer
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.prioritize.policy import load_policy
from cadnode.prioritize.stage import Prioritizer
from tests.answer_cases import ruleout_answer
from tests.peers import REPO

FILM_SIZE = 256  # as benchmarks/backlog.py pushes them


def received(database: Database, spool: Path, films: int) -> list[int]:
    """`films` single-film studies as receive leaves them: their job ids."""
    jobs = []
    with database.session() as session:
        for seed in range(films):
            film = write_chest_radiograph(spool / f"{seed}.dcm", seed=seed, size=FILM_SIZE)
            study = Study(study_uid=film.StudyInstanceUID)
            session.add(study)
            session.flush()
            assert study.id is not None
            job = Job(study_id=study.id, version=1, instance_count=1)
            session.add(job)
            session.flush()
            assert job.id is not None
            session.add(
                Instance(
                    sop_instance_uid=film.SOPInstanceUID,
                    sop_class_uid=film.SOPClassUID,
                    series_uid=film.SeriesInstanceUID,
                    transfer_syntax=str(film.file_meta.TransferSyntaxUID),
                    path=f"{seed}.dcm",
                    size=(spool / f"{seed}.dcm").stat().st_size,
                    calling_ae="MODALITY",
                    peer="127.0.0.1:1",
                    job_id=job.id,
                )
            )
            jobs.append(job.id)
        session.commit()
    return jobs


def inferred(database: Database, jobs: list[int]) -> None:
    """Each job answered by the rule-out engine (a normal film: ruled out)."""
    with database.session() as session:
        for job_id in jobs:
            job = session.get(Job, job_id)
            assert job is not None
            instance = session.exec(select(Instance).where(Instance.job_id == job_id)).one()
            session.add(
                Result(
                    job_id=job_id,
                    engine="cxr-ruleout",
                    engine_version="0.1.0",
                    model_sha256="ef" * 32,
                    sop_instance_uid=instance.sop_instance_uid,
                    answer=dump_answer(ruleout_answer(0.2)),
                )
            )
            job.state = JobState.inferred
            session.add(job)
        session.commit()


@dataclass(frozen=True)
class Cost:
    """Milliseconds per film: of this process's CPU time (what a loaded machine changes
    least), and of the wall clock."""

    cpu: float
    wall: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.cpu + other.cpu, self.wall + other.wall)

    def __str__(self) -> str:
        return f"{self.cpu:6.1f} ms CPU per film ({self.wall:.1f} ms wall)"


def per_film(run: Callable[[], object], films: int) -> Cost:
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return Cost(
        (time.process_time() - cpu) * 1000 / films, (time.perf_counter() - wall) * 1000 / films
    )


@contextlib.contextmanager
def profiled(path: Path | None, run: str) -> Iterator[None]:
    """cProfile on while inside, its statistics to `path.<run>` (nothing if `path` is None)."""
    if path is None:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    yield
    profiler.disable()
    profiler.dump_stats(f"{path}.{run}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", type=int, default=200)
    parser.add_argument(
        "--profile",
        type=Path,
        help="write cProfile's statistics to FILE.arrival, FILE.results, FILE.encode",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="film-cost-") as tmp:
        folder = Path(tmp)
        spool, results, answers = folder / "spool", folder / "results", folder / "answers"
        spool.mkdir()
        database = Database(folder / "cadnode.db")
        jobs = received(database, spool, args.films)
        prioritizer = Prioritizer(
            database,
            spool,
            load_policy(REPO / "config" / "priority.yaml"),
            PrioritySettings(),
            retrieve_ae="CADNODE",
        )
        with profiled(args.profile, "arrival"):
            arrival = per_film(prioritizer.advance, args.films)
        inferred(database, jobs)
        with profiled(args.profile, "results"):
            settled = per_film(prioritizer.advance, args.films)
        pacs = Destination(ae_title="PACS", host="127.0.0.1", port=11112)
        encoder = Encoder(
            database,
            spool,
            results,
            {"pacs": pacs},
            answers=answers,
            max_decoded_bytes=DEFAULT_LIMIT,
        )
        with profiled(args.profile, "encode"):
            encode = per_film(encoder.advance, args.films)
        with database.session() as session:
            left = session.exec(select(Job).where(col(Job.state) != JobState.encoded)).all()
        if left:
            raise SystemExit(f"{len(left)} jobs were not encoded: {left[0].reason}")
        print(f"films: {args.films}")
        print(f"encode:              {encode}")
        print(f"prioritize:          {arrival + settled}")
        print(f"  of which arrival:  {arrival}")
        print(f"  of which results:  {settled}")


if __name__ == "__main__":
    main()
