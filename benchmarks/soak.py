"""Soak: chest films pushed without pause for minutes, retention in minutes, the PACS stopped
and restarted twice, the node SIGTERMed and restarted once; nothing lost, memory and disk flat.

DCMTK storescu pushes single-film chest studies (phantoms, generated once into
benchmarks/out/ and reused, each push under fresh UIDs) over several associations at a
steady rate to a real `cadnode serve`, which runs the rule-out engine (and the segmenter on
the films it does not rule out) and delivers the results to Orthanc. Retention is set to
minutes (`retention` below), so the node deletes what it has delivered while it runs. Along
the way the node is SIGTERMed and started again, and the PACS is stopped twice for a while.

Orthanc logs every object it is sent (a Lua ReceivedInstanceFilter), so the PACS itself
says what arrived and how often. The figures:

- studies in (pushed, each acknowledged by storescu) and out (with their SR at the PACS),
  none lost;
- every result received by the PACS exactly once (by SOP Instance UID, over every PACS run),
  and every study processed once (its rule-out SR, plus the segmenter's SEG and SR when it
  is not ruled out; a job run again would add results under new UIDs);
- the node's resident memory and its data dir's disk use at the start (once retention has
  begun deleting), the middle and the end, as ratios to the start: flat means under 1.2x.

The pushers hold back while more than --backlog studies wait to be processed, so the load
is one the node sustains (what a soak measures is drift, not throughput); the rate reached
and the time held back are printed.

    .venv/bin/python benchmarks/soak.py [--minutes 15] [--rate 3] [--associations 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers import REPO, Cadnode, free_port, run_cadnode, run_orthanc, storescu

# --- the retention the node runs with: cadnode/core/config.py RetentionSettings ------------


def retention(age_s: int) -> dict[str, str | float]:
    """Every kind kept `age_s` after its study is finished; housekeeping every eighth of it."""
    age = f"{age_s}s"
    return {
        "images": age,
        "results": age,
        "answers": age,
        "jobs": age,
        "audit": age,
        "check_every_s": max(5.0, age_s / 8),
    }


def retention_age_s(minutes: float) -> int:
    """A tenth of the run (90 s for 15 minutes; never under 20 s), so that every sample is
    taken when what it counts has had time to be delivered and reach its age."""
    return max(20, round(minutes * 6))


# ----------------------------------------------------------------------------------------------

FILMS_CACHE = REPO / "benchmarks" / "out"
POOL_SIZE = 200  # distinct phantom films; each push reuses one under fresh UIDs
FILM_SIZE = 512
POSITIVE_FRACTION = 0.2  # films with a finding: the segmenter runs too (SEG and its SR)
BATCH = 10  # films per storescu association
SAMPLE_EVERY_S = 5.0
FLAT = 1.2
NOT_REMOVALS = {"seconds", "skipped_studies"}  # the other numbers of a retention.pass event
# Each study's results at the PACS when processed once: the rule-out SR alone, or with the
# segmenter's SEG and SR when the film is not ruled out.
ONCE = ("1 SR + 0 SEG", "2 SR + 1 SEG")
LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  print('soak-received ' .. tostring(dicom.StudyInstanceUID) .. ' ' ..
        tostring(dicom.SOPInstanceUID) .. ' ' .. tostring(dicom.Modality))
  return true
end
"""


def film_pool() -> list[Path]:
    """The phantom films, generated on the first run and kept under benchmarks/out/."""
    folder = FILMS_CACHE / f"soak-cxr-{FILM_SIZE}-{POOL_SIZE}-{POSITIVE_FRACTION}"
    films = sorted(folder.glob("*.dcm"))
    if len(films) < POOL_SIZE:
        train = Path(sys.executable).with_name("cadnode-train")
        subprocess.run(
            [str(train), "phantoms", "--kind", "cxr", "--count", str(POOL_SIZE), "--out",
             str(folder), "--size", str(FILM_SIZE), "--positive-fraction",
             str(POSITIVE_FRACTION), "--seed", "40000"],
            check=True, capture_output=True,
        )  # fmt: skip
        films = sorted(folder.glob("*.dcm"))
    return films


# --- the pushers ------------------------------------------------------------------------------


@dataclass
class Traffic:
    """What the pushers have had acknowledged, and how long they were held back."""

    pushed: list[str] = field(default_factory=list)  # study UIDs, in order
    held_back_s: float = 0.0
    retried_batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Pushers:
    def __init__(self, films: list[Path], port: int, scratch: Path, args: argparse.Namespace):
        self.films, self.port, self.scratch = films, port, scratch
        self.rate, self.backlog, self.associations = args.rate, args.backlog, args.associations
        self.database: Path | None = None
        self.traffic = Traffic()
        self.stop = threading.Event()
        self._next_slot = time.monotonic()
        self._slot_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True)
            for n in range(self.associations)
        ]

    def start(self, database: Path) -> None:
        self.database = database
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, number: int) -> None:
        batches = 0
        while not self.stop.is_set():
            self._wait_for_room()
            folder = self.scratch / f"pusher-{number}-{batches}"
            studies = self._fresh_batch(folder, number * 1_000_003 + batches * BATCH)
            if self._push(folder):
                with self.traffic.lock:
                    self.traffic.pushed.extend(studies)
            for file in folder.iterdir():
                file.unlink()
            folder.rmdir()
            batches += 1

    def _wait_for_room(self) -> None:
        """The steady rate, shared by every pusher; held back while the node is behind."""
        with self._slot_lock:
            slot = self._next_slot = max(self._next_slot + BATCH / self.rate, time.monotonic())
        self.stop.wait(max(0.0, slot - time.monotonic()))
        held = time.monotonic()
        while not self.stop.is_set() and unprocessed(self.database) > self.backlog:
            self.stop.wait(0.5)
        with self.traffic.lock:
            self.traffic.held_back_s += time.monotonic() - held

    def _fresh_batch(self, folder: Path, first: int) -> list[str]:
        folder.mkdir(parents=True)
        studies = []
        for n in range(BATCH):
            ds = dcmread(self.films[(first + n) % len(self.films)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.AccessionNumber = f"SOAK{first + n}"[:16]
            ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
            studies.append(str(ds.StudyInstanceUID))
        return studies

    def _push(self, folder: Path) -> bool:
        """Until storescu has every film acknowledged; a batch cut short (the node stopping)
        is sent again whole: the node stores an instance it already holds once."""
        files = sorted(folder.glob("*.dcm"))
        while True:
            if acknowledged(self.port, files):
                return True
            with self.traffic.lock:
                self.traffic.retried_batches += 1
            if self.stop.wait(1.0):
                return False  # the run is over; this batch was never acknowledged


def acknowledged(port: int, files: list[Path]) -> bool:
    """storescu sent every file and the node answered each with Success (an error or a
    failure status is an "E:" or "F:" line)."""
    try:
        done = storescu(port, *files, calling_ae="SOAK")
    except subprocess.TimeoutExpired:
        return False
    errors = [line for line in done.stderr.splitlines() if line.startswith(("E:", "F:"))]
    return done.returncode == 0 and not errors


def unprocessed(database: Path | None) -> int:
    """Studies the node has received and not yet processed (read-only, beside the node)."""
    if database is None or not database.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            [(count,)] = connection.execute(
                "SELECT count(*) FROM job WHERE state IN "
                "('received', 'complete', 'routed', 'inferred')"
            )
        return int(count)
    except sqlite3.Error:
        return 0


# --- the PACS, stopped and started on the same port and storage ------------------------------


class Pacs:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.runs = 0
        self._stack: ExitStack | None = None
        (folder / "receipts.lua").parent.mkdir(parents=True, exist_ok=True)
        (folder / "receipts.lua").write_text(LUA)

    def start(self) -> None:
        self.runs += 1
        extra = {
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "LuaScripts": [str(self.folder / "receipts.lua")],
        }
        self._stack = ExitStack()
        self.orthanc = self._stack.enter_context(
            run_orthanc(self.folder / f"run-{self.runs}", self.dicom_port, extra)
        )

    def stop(self) -> None:
        assert self._stack is not None
        self._stack.close()
        self._stack = None

    def receipts(self) -> list[tuple[str, str, str]]:
        """(study UID, SOP Instance UID, modality) of every object sent to it, every run."""
        found = []
        for run in range(1, self.runs + 1):
            for line in (self.folder / f"run-{run}" / "orthanc.log").read_text().splitlines():
                if "soak-received " in line:
                    study, sop, modality = line.split("soak-received ", 1)[1].split()[:3]
                    found.append((study, sop, modality))
        return found

    def instance_count(self) -> int:
        return int(self.orthanc.get("/statistics")["CountInstances"])


# --- the node ---------------------------------------------------------------------------------


class Node:
    def __init__(self, folder: Path, config: Path, dicom_port: int) -> None:
        self.folder, self.config, self.dicom_port = folder, config, dicom_port
        self._stack = ExitStack()
        self.process: Cadnode | None = None

    def start(self) -> None:
        self.process = self._stack.enter_context(
            run_cadnode(
                self.folder,
                None,
                CADNODE_CONFIG=str(self.config),
                CADNODE_DICOM_PORT=str(self.dicom_port),
            )
        )

    def sigterm_and_restart(self) -> tuple[int, float, float]:
        """(exit status, seconds to exit, seconds until it listens again)."""
        assert self.process is not None
        stopping = time.monotonic()
        self.process.process.send_signal(signal.SIGTERM)
        status = self.process.process.wait(120)
        exited = time.monotonic() - stopping
        self._stack.close()
        self._stack = ExitStack()
        self.start()
        return status, exited, time.monotonic() - stopping

    def close(self) -> None:
        self._stack.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.process.pid

    @property
    def data_dir(self) -> Path:
        return self.folder / "var"

    @property
    def database(self) -> Path:
        return self.data_dir / "cadnode.db"


def resident_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")  # between the node's stop and its restart


def disk_mb(data_dir: Path) -> dict[str, float]:
    """Space the data dir's files take on disk (blocks, not lengths), per top-level entry:
    spool, results, answers, the database with its WAL, and the rest."""
    parts: Counter[str] = Counter()
    for root, _, files in os.walk(data_dir):
        top = Path(root).relative_to(data_dir).parts[:1]
        for name in files:
            part = top[0] if top else ("database" if name.startswith("cadnode.db") else name)
            with contextlib.suppress(FileNotFoundError):  # retention deleted it meanwhile
                parts[part] += os.lstat(os.path.join(root, name)).st_blocks * 512
    return {part: size / 2**20 for part, size in parts.items()}


@dataclass
class Sample:
    at_s: float
    rss_mb: float
    disk_parts: dict[str, float]
    pid: int

    @property
    def disk_mb(self) -> float:
        return sum(self.disk_parts.values())


@contextmanager
def sampling(node: Node, started: float) -> Iterator[list[Sample]]:
    samples: list[Sample] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_EVERY_S):
            pid = node.pid
            at = time.monotonic() - started
            samples.append(Sample(at, resident_mb(pid), disk_mb(node.data_dir), pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Schedule:
    """Seconds from the start, as fractions of the run: the node's restart first (so start,
    middle and end are one process), the PACS outages in the middle, and the first sample
    once retention has been deleting for a while."""

    length_s: float

    def at(self, fraction: float) -> float:
        return fraction * self.length_s

    @property
    def node_restart(self) -> float:
        return self.at(0.10)

    @property
    def outages(self) -> list[tuple[float, float]]:
        return [(self.at(0.30), self.at(0.36)), (self.at(0.62), self.at(0.68))]

    @property
    def samples(self) -> dict[str, float]:
        """Each well after the retention age has passed since the last disturbance."""
        return {"start": self.at(0.25), "middle": self.at(0.55), "end": self.at(1.0)}


def node_config(folder: Path, pacs: Pacs, minutes: float) -> Path:
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                  "port": pacs.dicom_port}},
        "results": {"destinations": ["pacs"]},
        "retention": retention(retention_age_s(minutes)),
    }  # fmt: skip
    path = folder / "cadnode.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@dataclass
class Figures:
    films: int
    events: list[str]
    samples: list[Sample]
    traffic: Traffic
    push_s: float
    drain_s: float
    receipts: list[tuple[str, str, str]]  # (study, SOP Instance UID, modality) at the PACS
    pacs_instances: int
    dead_letters: int
    removed: dict[str, int]  # what retention removed, summed over its passes (the node's log)
    passes: int


def run(args: argparse.Namespace, scratch: Path) -> Figures:
    films = film_pool()
    schedule = Schedule(args.minutes * 60)
    pacs = Pacs(scratch / "pacs")
    pacs.start()
    node = Node(scratch / "node", node_config(scratch, pacs, args.minutes), free_port())
    node.start()
    pushers = Pushers(films, node.dicom_port, scratch / "batches", args)
    started = time.monotonic()
    try:
        with sampling(node, started) as samples:
            pushers.start(node.database)
            events = play(schedule, node, pacs, started)
            pushers.join()
            push_s = time.monotonic() - started
            drain_s = drain(pushers.traffic.pushed, pacs, args.drain_minutes * 60)
        log = (node.folder / "cadnode.log").read_text()
        return Figures(
            films=len(films),
            events=events,
            samples=samples,
            traffic=pushers.traffic,
            push_s=push_s,
            drain_s=drain_s,
            receipts=pacs.receipts(),
            pacs_instances=pacs.instance_count(),
            dead_letters=log.count('"delivery.dead_lettered"'),
            **retention_removed(log),
        )
    finally:
        pushers.stop.set()
        node.close()
        pacs.stop()


def retention_removed(log: str) -> dict[str, Any]:
    """The counts of every `retention.pass` event in the node's log, summed."""
    removed: Counter[str] = Counter()
    passes = 0
    for line in log.splitlines():
        if '"retention.pass"' in line:
            passes += 1
            removed.update(
                {
                    key: value
                    for key, value in json.loads(line).items()
                    if isinstance(value, int) and key not in NOT_REMOVALS
                    and not key.startswith("disk_")
                }
            )  # fmt: skip
    return {"removed": dict(removed), "passes": passes}


def play(schedule: Schedule, node: Node, pacs: Pacs, started: float) -> list[str]:
    """The outages, in order, at their times; what happened, in words."""

    def until(moment: float) -> None:
        time.sleep(max(0.0, started + moment - time.monotonic()))

    minute = 60.0
    until(schedule.node_restart)
    status, exited, listening = node.sigterm_and_restart()
    events = [
        f"node SIGTERMed at {schedule.node_restart / minute:.1f} min: exit status {status} "
        f"after {exited:.1f} s, listening again after {listening:.1f} s"
    ]
    for down, up in schedule.outages:
        until(down)
        pacs.stop()
        until(up)
        pacs.start()
        events.append(f"PACS down from {down / minute:.1f} to {up / minute:.1f} min")
    until(schedule.length_s)
    assert status == 0, f"the node exited {status} on SIGTERM"
    return events


def drain(pushed: list[str], pacs: Pacs, limit_s: float) -> float:
    """Seconds until every pushed study's SR is at the PACS (or the limit)."""
    started = time.monotonic()
    wanted = set(pushed)
    while time.monotonic() - started < limit_s:
        arrived = {study for study, _, modality in pacs.receipts() if modality == "SR"}
        if wanted <= arrived:
            break
        time.sleep(2)
    return time.monotonic() - started


def level_at(samples: list[Sample], moment: float, value: str, length_s: float) -> float:
    """The median of `value` over the samples within 3% of the run of `moment` (5 s apart,
    one sample alone is noise: a burst of films in flight, a housekeeping pass)."""
    window = max(SAMPLE_EVERY_S, 0.03 * length_s)
    near = [getattr(s, value) for s in samples if abs(s.at_s - moment) <= window]
    return statistics.median(v for v in near if not math.isnan(v))


def report(args: argparse.Namespace, figures: Figures) -> bool:
    """Print the figures; True when nothing was lost, sent twice or processed twice."""
    traffic, receipts = figures.traffic, figures.receipts
    pushed = set(traffic.pushed)
    with_sr = {study for study, _, modality in receipts if modality == "SR"}
    lost = pushed - with_sr
    per_object = Counter(sop for _, sop, _ in receipts)
    twice = {sop: n for sop, n in per_object.items() if n > 1}
    policy = retention(retention_age_s(args.minutes))
    print(
        f"soak: {args.minutes:g} min of chest films ({FILM_SIZE}x{FILM_SIZE}, {figures.films} "
        f"phantoms reused under fresh UIDs), {args.associations} associations, target "
        f"{args.rate:g} films/s; retention {policy['images']} (every kind), checked every "
        f"{policy['check_every_s']:g} s"
    )
    for event in figures.events:
        print(f"  {event}")
    print(
        f"  studies in: {len(pushed)} pushed and acknowledged "
        f"({len(pushed) / figures.push_s:.2f}/s; held back {traffic.held_back_s:.0f} s while "
        f"the node was behind; {traffic.retried_batches} batch(es) sent again)"
    )
    print(
        f"  studies out: {len(pushed & with_sr)} with their SR at the PACS, "
        f"{figures.drain_s:.0f} s after the last push; lost {len(lost)}"
    )
    kinds = dict(Counter(modality for _, _, modality in receipts))
    print(
        f"  results: {len(per_object)} objects received by the PACS {kinds}, each exactly "
        f"once: {'yes' if not twice else f'NO, {len(twice)} more than once'}; the PACS holds "
        f"{figures.pacs_instances}; dead letters {figures.dead_letters}"
    )
    shapes = per_study(receipts, pushed)
    rerun = sum(n for shape, n in shapes.items() if shape not in ONCE)
    print(
        f"  results per study: {shapes}; processed more than once (more SRs than 1 + its "
        f"SEGs): {rerun}"
    )
    print(f"  retention: {figures.passes} passes removed {figures.removed}")
    for name, value in (("resident memory", "rss_mb"), ("disk (data dir)", "disk_mb")):
        print(f"  {name}: {flatness(figures, value)}")
    print(f"  disk by part, start -> end: {disk_parts(figures)}")
    if lost:
        print(f"  lost, e.g.: {sorted(lost)[:3]}")
    return not lost and not twice and not rerun


def per_study(receipts: list[tuple[str, str, str]], pushed: set[str]) -> dict[str, int]:
    """How many studies got each (SR count, SEG count): a job run twice would show as more."""
    objects: dict[str, Counter[str]] = {study: Counter() for study in pushed}
    for study, _, modality in set(receipts):
        if study in objects:
            objects[study][modality] += 1
    shapes = Counter(f"{c['SR']} SR + {c['SEG']} SEG" for c in objects.values())
    return dict(shapes.most_common())


def disk_parts(figures: Figures) -> str:
    points = Schedule(figures.push_s).samples
    parts = sorted({part for sample in figures.samples for part in sample.disk_parts})

    def at(part: str, moment: float) -> float:
        return statistics.median(
            s.disk_parts.get(part, 0.0)
            for s in figures.samples
            if abs(s.at_s - moment) <= max(SAMPLE_EVERY_S, 0.03 * figures.push_s)
        )

    return ", ".join(
        f"{part} {at(part, points['start']):.0f} -> {at(part, points['end']):.0f} MB"
        for part in parts
    )


def flatness(figures: Figures, value: str) -> str:
    samples, length = figures.samples, figures.push_s
    points = Schedule(length).samples
    levels = {k: level_at(samples, t, value, length) for k, t in points.items()}
    shown = ", ".join(f"{k} ({points[k] / 60:.1f} min) {v:.0f} MB" for k, v in levels.items())
    middle, end = levels["middle"] / levels["start"], levels["end"] / levels["start"]
    peak = max((s for s in samples if s.at_s >= points["start"]), key=lambda s: getattr(s, value))
    verdict = "flat" if max(end, middle) < FLAT else "NOT flat"
    return (
        f"{shown}; middle/start {middle:.2f}x, end/start {end:.2f}x ({verdict}: under {FLAT}x); "
        f"highest after the start {getattr(peak, value):.0f} MB at {peak.at_s / 60:.1f} min"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15, help="how long films are pushed")
    parser.add_argument("--rate", type=float, default=3, help="films per second, all pushers")
    parser.add_argument("--associations", type=int, default=2, help="storescu pushers at once")
    parser.add_argument(
        "--backlog",
        type=int,
        default=100,
        help="hold the pushers while more studies than this await processing",
    )
    parser.add_argument(
        "--drain-minutes",
        type=float,
        default=10,
        help="at most this long after the last push for the last results",
    )
    parser.add_argument("--keep", action="store_true", help="keep the node's and PACS' folders")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="cadnode-soak-"))
    try:
        figures = run(args, scratch)
    finally:
        if not args.keep:
            shutil.rmtree(scratch)
    if args.keep:
        print(f"  kept: {scratch}")
    if not report(args, figures):
        sys.exit("soak: a study was lost, or a result sent or a study processed twice")


if __name__ == "__main__":
    main()
