"""Backlog: a thousand chest studies pushed at once, every one processed, memory flat.

DCMTK storescu pushes N single-film chest studies (normal phantom films, 256x256 DX) to
cadnode over one association, as fast as it can; cadnode receives, routes, runs the
rule-out engine, writes an SR per study and delivers it to Orthanc. Each layout runs in
turn on the same films:

- `sqlite-1`, `sqlite-2`: one node on SQLite, the CPU-bound stages in the node's process
  (`node.workers: 1`) or in two worker processes (cadnode/workers.py);
- `postgres-1`, `postgres-2`: the same on PostgreSQL (a server started here, as the tests
  start one: tests/postgres.py);
- `two-nodes`: two `cadnode serve` (one worker each) on one PostgreSQL database and one data
  dir, half of the films pushed to each at once.

The figures, per layout:

- none lost: every study ends `delivered` and Orthanc holds exactly N SRs;
- time from the push's start to the last SR stored, as a ratio to the anchor measured in the
  same run: the same N films pushed straight into the same kind of Orthanc (what storing
  alone costs);
- where a film's time goes, by stage: from each job's timeline (the moment it entered each
  state), the median and 95th percentile of the time spent before each state (waiting for
  the stage included: in a backlog, mostly waiting);
- memory: the node's main process's resident set size, sampled every half second, at its
  peak against when the first tenth of the studies had been delivered (flat = close to 1).

    .venv/bin/python benchmarks/backlog.py [--films 1000] [--layouts sqlite-1,sqlite-2,...]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlmodel import select

from cadnode.core.db import Database, Job
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.peers import REPO, Cadnode, Orthanc, run_cadnode, run_orthanc, wait_for
from tests.postgres import PostgresServer, fresh_database, run_postgres

LAYOUTS = ("sqlite-1", "sqlite-2", "postgres-1", "postgres-2", "two-nodes")
# Each state a job passes, after the one before it (received: its first instance).
STAGES = (
    ("complete", "assemble"),
    ("routed", "route"),
    ("inferred", "infer"),
    ("encoded", "encode"),
    ("delivered", "dispatch"),
)


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def push(port: int, called_ae: str, films: list[Path]) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        ["storescu", "-aet", "BACKLOG", "-aec", called_ae, "127.0.0.1", str(port)]
        + [str(film) for film in films],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    return time.perf_counter() - start


def stored(pacs: Orthanc) -> int:
    return int(pacs.get("/statistics")["CountInstances"])


@dataclass
class Outcome:
    layout: str
    received_s: float
    processed_s: float
    delivered: int
    in_pacs: int
    memory: tuple[float, float]  # (MB at 10% delivered, peak MB)
    stages: dict[str, list[float]]  # stage -> seconds per job


def config_file(folder: Path, pacs: Orthanc, *, workers: int, name: str) -> Path:
    """The shipped rules and engines, results to `pacs`, `workers` worker processes."""
    config = {
        "node": {"name": name, "workers": workers},
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "destinations": {
            "pacs": {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
        },
        "results": {"destinations": ["pacs"]},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


@contextlib.contextmanager
def nodes(
    folder: Path, pacs: Orthanc, layout: str, database_url: str | None
) -> Iterator[list[Cadnode]]:
    """The layout's `cadnode serve` processes, started in turn (each on its own ports)."""
    count, workers = (2, 1) if layout == "two-nodes" else (1, int(layout.rsplit("-", 1)[1]))
    environment = {"CADNODE_DATABASE_URL": database_url} if database_url else {}
    with contextlib.ExitStack() as stack:
        started = []
        for number in range(count):
            config = config_file(folder, pacs, workers=workers, name=f"node{number}")
            started.append(
                stack.enter_context(
                    run_cadnode(
                        folder / f"node{number}",
                        None,
                        CADNODE_CONFIG=str(config),
                        CADNODE_DATA_DIR=str(folder / "shared-data"),
                        **environment,
                    )
                )
            )
        yield started


def run_layout(
    folder: Path, films: list[Path], layout: str, postgres: PostgresServer | None
) -> Outcome:
    count = len(films)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database(postgres)) if postgres is not None else None
        pacs = stack.enter_context(run_orthanc(folder / "pacs"))
        started = stack.enter_context(nodes(folder, pacs, layout, url))
        pid = started[0].process.pid
        samples: list[tuple[int, float]] = []  # (SRs in the PACS, resident MB)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                samples.append((stored(pacs), resident_mb(pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        shares = [films[number :: len(started)] for number in range(len(started))]
        with ThreadPoolExecutor(len(started)) as pool:  # at once, one push per node
            pushes = [
                pool.submit(push, node.dicom_port, "CADNODE", share)
                for node, share in zip(started, shares, strict=True)
            ]
            for pushed in pushes:
                pushed.result()  # a failed push ends the run, with storescu's output
        received = time.perf_counter() - start
        wait_for(lambda: stored(pacs) >= count, 3600, "every SR in the PACS", 0.5)
        processed = time.perf_counter() - start
        done.set()
        sampler.join()
        # A job is `delivered` once dispatch has recorded every one of its deliveries.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: states(started[0]).count("delivered") == count, 120, "delivered", 0.5)
        jobs = timelines(url or folder / "shared-data" / "cadnode.db")
        in_pacs = stored(pacs)  # anything sent twice would show now
    delivered = [job["state"] for job in jobs].count("delivered")
    if delivered != count:
        print(f"  {layout}: job states {dict(Counter(job['state'] for job in jobs))}")
    early = next((mb for n, mb in samples if n >= count // 10), samples[0][1])
    peak = max(mb for _, mb in samples)
    return Outcome(layout, received, processed, delivered, in_pacs, (early, peak), by_stage(jobs))


def states(node: Cadnode) -> list[str]:
    return [row["state"] for row in node.studies()]


def timelines(where: str | Path) -> list[dict[str, object]]:
    """Each job's state, when its first instance arrived, and when it entered each state."""
    database = Database(where)
    with database.session() as session:
        jobs = [
            {"state": job.state.value, "received": job.first_instance_at, **job.timeline}
            for job in session.exec(select(Job))
        ]
    database.engine.dispose()
    return jobs


def by_stage(jobs: list[dict[str, object]]) -> dict[str, list[float]]:
    """Per stage, each job's seconds from entering the state before to entering the next."""
    spent: dict[str, list[float]] = {stage: [] for _, stage in STAGES}
    for job in jobs:
        before = _moment(job["received"])
        for state, stage in STAGES:
            if state not in job:
                break
            entered = _moment(job[state])
            spent[stage].append((entered - before).total_seconds())
            before = entered
    return spent


def _moment(value: object) -> dt.datetime:
    moment = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def report(outcome: Outcome, anchor_s: float, count: int) -> None:
    early, peak = outcome.memory
    print(f"  {outcome.layout}:")
    print(
        f"    received in {outcome.received_s:.1f} s; every SR in Orthanc after "
        f"{outcome.processed_s:.1f} s: {outcome.processed_s / anchor_s:.2f}x the anchor"
    )
    print(
        f"    studies delivered {outcome.delivered} of {count}; SRs in Orthanc "
        f"{outcome.in_pacs} (expected {count}); main process memory {early:.0f} MB at 10% "
        f"delivered, peak {peak:.0f} MB ({peak / early:.2f}x)"
    )
    print(
        "    per film, by stage (median / p95 s, waiting included): "
        + ", ".join(
            f"{stage} {statistics.median(seconds):.2f} / {percentile(seconds, 0.95):.2f}"
            for stage, seconds in outcome.stages.items()
            if seconds
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", "--studies", type=int, default=1000)
    parser.add_argument(
        "--layouts",
        default=",".join(LAYOUTS),
        help=f"comma-separated, of {', '.join(LAYOUTS)} (default: all)",
    )
    args = parser.parse_args()
    count = args.films
    layouts = [layout for layout in args.layouts.split(",") if layout]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        parser.error(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
    outcomes = []
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        folder = Path(scratch)
        films = []
        for i in range(count):
            path = folder / "films" / f"{i}.dcm"
            write_chest_radiograph(path, seed=20_000 + i, size=256)
            films.append(path)
        with run_orthanc(folder / "anchor") as anchor:
            direct = push(anchor.dicom_port, anchor.ae_title, films)
            wait_for(lambda: stored(anchor) >= count, 120, "the anchor to store every film")
        needs_postgres = any(not layout.startswith("sqlite") for layout in layouts)
        postgres = stack.enter_context(run_postgres()) if needs_postgres else None
        for layout in layouts:
            uses = None if layout.startswith("sqlite") else postgres
            outcomes.append(run_layout(folder / layout, films, layout, uses))

    print(f"backlog: {count} chest studies pushed at once ({os.cpu_count()} cores)")
    print(f"  anchor, the films pushed straight into Orthanc: {direct:.1f} s")
    for outcome in outcomes:
        report(outcome, direct, count)
    lost = [o.layout for o in outcomes if o.delivered != count or o.in_pacs != count]
    assert not lost, f"a study was lost or sent twice in {lost}"


if __name__ == "__main__":
    main()
