"""Ingest throughput: DCMTK storescu pushing studies to cadnode, to DCMTK storescp, to Orthanc.

Two generated studies, a 300-instance 512x512 CT and a 20-image 3000x3000 DX, each pushed
with one association and with 4 concurrent ones (the files split between 4 storescu
processes), TCP_NODELAY=1 for the DCMTK tools. Every receiver starts empty for every push,
then takes a warm-up study of the same size (other UIDs) and settles (cadnode: its journal
checkpointed, so it has spare segments, as a node has after its first study, and the study
processed) before the push that is timed. The figures are throughput ratios in the same run
(cadnode / storescp, cadnode / Orthanc): the machines here are shared and noisy, absolute
seconds mean little. Each push also counts the CPU the receiving side spent during it (its
process and every child, from /proc: cadnode's main and receiver processes, storescp), per
instance, and its ratio to storescp's: with four associations on two CPUs the node's CPU per
instance is what bounds its throughput, and the figure a change to its cost moves. (It is
no steadier than the throughput's ratio: storescp's own CPU per instance, mostly the
kernel's page-cache work, varied from 1.5 to 2.7 ms between two runs of one sitting, the
node's from 7.0 to 7.5.)

    .venv/bin/python benchmarks/ingest.py [--repeat 3] [--ct 300] [--dx 20] [--targets ...]

Targets: cadnode (the default, `dicom.receivers: auto`: 4 receiver processes on 2 to 4 CPUs),
cadnode-1p (receiving in the node's process), cadnode-2p and cadnode-4p (two or four receiver
processes), cadnode-before and cadnode-2p-before (one and two processes on round 1's receive
path: pynetdicom's polling loops, each spool file fsynced and renamed before the answer),
storescp, orthanc. Each cadnode is also compared with cadnode-1p.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cadnode.ingest.journal import SUFFIX, journal_folder
from tests.hostile.memory import children
from tests.peers import free_port, port_open, run_cadnode, run_orthanc, wait_for
from tests.synthetic import write_ct_series, write_dx_images


@dataclass
class Target:
    """A receiver ready for one push: where to send, and how many instances it holds."""

    port: int
    ae_title: str
    stored: Callable[[], int]
    settled: Callable[[], bool] = lambda: True  # done with what it took (cadnode: checkpointed)
    pid: int | None = None  # the receiving process, whose CPU (its children's too) is counted


@dataclass(frozen=True)
class Push:
    seconds: float
    cpu_seconds: float | None  # the receiving side's CPU during the push; None: not counted


TargetFactory = Callable[[Path], AbstractContextManager[Target]]


# Job states after which the node does nothing more with a study (no destination here).
FINAL_STATES = {"ignored", "encoded", "delivered", "failed"}

# Round 1's receive path, for before/after figures in one run: pynetdicom's polling loops and
# each spool file fsynced and renamed into place before the answer.
BEFORE = {"CADNODE_DICOM_REACTOR": "stock", "CADNODE_SPOOL_JOURNAL": "false"}


def cadnode_with(receivers: str, **overrides: str) -> TargetFactory:
    """cadnode with `dicom.receivers` receiver processes (1: receiving in the node's own)."""

    @contextmanager
    def cadnode(folder: Path) -> Iterator[Target]:
        settings = {"CADNODE_DICOM_RECEIVERS": receivers, **overrides}
        with run_cadnode(folder, None, **settings) as node:
            spool = node.data_dir / "spool"

            def settled() -> bool:
                """Its journal checkpointed and every study it took processed: the warm-up
                study's assembling and routing would otherwise run during the timed push."""
                if any(journal_folder(spool).glob(f"*{SUFFIX}")):
                    return False
                return all(study["state"] in FINAL_STATES for study in node.studies())

            yield Target(
                node.dicom_port,
                "CADNODE",
                lambda: sum(1 for _ in spool.rglob("*.dcm")),
                settled,
                node.process.pid,
            )

    return cadnode


@contextmanager
def storescp(folder: Path) -> Iterator[Target]:
    port = free_port()
    out = folder / "out"
    out.mkdir(parents=True)
    process = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port), 20, "storescp to listen")
        yield Target(port, "STORESCP", lambda: sum(1 for _ in out.iterdir()), pid=process.pid)
    finally:
        process.terminate()
        process.wait(20)


@contextmanager
def orthanc(folder: Path) -> Iterator[Target]:
    with run_orthanc(folder) as pacs:
        yield Target(
            pacs.dicom_port, pacs.ae_title, lambda: int(pacs.get("/statistics")["CountInstances"])
        )


TARGETS: dict[str, TargetFactory] = {
    "cadnode": cadnode_with("auto"),  # the default
    "cadnode-1p": cadnode_with("1"),  # receiving in the node's process
    "cadnode-2p": cadnode_with("2"),  # two receiver processes
    "cadnode-4p": cadnode_with("4"),
    "cadnode-before": cadnode_with("1", **BEFORE),  # round 1: stock reactor, renamed files
    "cadnode-2p-before": cadnode_with("2", **BEFORE),
    "storescp": storescp,
    "orthanc": orthanc,
}


def push(target: Target, files: list[Path], associations: int) -> float:
    """Seconds for `associations` storescu processes to push `files` between them."""
    shares = [files[i::associations] for i in range(associations)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                "storescu",
                "-aet",
                "BENCH",
                "-aec",
                target.ae_title,
                "127.0.0.1",
                str(target.port),
                *map(str, share),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for share in shares
    ]
    failures = [p.communicate()[1] for p in processes if p.wait() != 0]
    elapsed = time.perf_counter() - start
    assert not failures, failures[0].decode(errors="replace")[-2000:]
    return elapsed


def measure(
    factory: TargetFactory,
    scratch: Path,
    files: list[Path],
    associations: int,
    warm_up: list[Path] | None = None,
) -> Push:
    """Push `files` to a fresh target, after it took `warm_up` and settled: the seconds,
    and the CPU the target spent meanwhile."""
    with tempfile.TemporaryDirectory(dir=scratch) as folder, factory(Path(folder)) as target:
        before = warmed(target, warm_up or [], associations)
        cpu_before = tree_cpu_seconds(target.pid)
        seconds = push(target, files, associations)
        cpu_after = tree_cpu_seconds(target.pid)
        # Every target must hold every instance: a fast receiver that drops data is no anchor.
        expected = before + len(files)
        wait_for(lambda: target.stored() >= expected, 60, "every instance to be stored")
        spent = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        return Push(seconds, spent)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU of a process and its descendants, from /proc (Linux; None where
    there is no /proc or no process to count). Children that end are no longer counted, so
    only a difference over a time they all live is meaningful."""
    if pid is None or not Path("/proc/self/stat").exists():
        return None
    try:
        family = [pid, *children(pid)]
    except OSError:  # it has ended
        return None
    return sum(_cpu_seconds(member) for member in family)


def _cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # it ended meanwhile
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (name) "
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def warmed(target: Target, files: list[Path], associations: int) -> int:
    """Push the warm-up study and wait until the target holds it and has settled."""
    if files:
        push(target, files, associations)
        wait_for(
            lambda: target.stored() >= len(files) and target.settled(), 60, "the warm-up to settle"
        )
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="pushes per figure (median)")
    parser.add_argument("--ct", type=int, default=300, help="CT instances")
    parser.add_argument("--dx", type=int, default=20, help="DX images")
    parser.add_argument(
        "--targets",
        default="cadnode,cadnode-1p,cadnode-before,storescp,orthanc",
        help="comma-separated",
    )
    parser.add_argument("--associations", default="1,4", help="comma-separated")
    args = parser.parse_args()
    names = args.targets.split(",")
    concurrency = [int(n) for n in args.associations.split(",")]

    with tempfile.TemporaryDirectory(prefix="cadnode-ingest-") as scratch_name:
        scratch = Path(scratch_name)
        print(f"generating a {args.ct}-instance 512x512 CT and {args.dx} 3000x3000 DX images...")
        studies = {
            f"CT {args.ct} x 512x512": write_ct_series(scratch / "ct", args.ct),
            f"DX {args.dx} x 3000x3000": write_dx_images(scratch / "dx", args.dx),
        }
        warm_ups = {
            f"CT {args.ct} x 512x512": write_ct_series(scratch / "ct-warm", args.ct),
            f"DX {args.dx} x 3000x3000": write_dx_images(scratch / "dx-warm", args.dx),
        }
        rows = []
        for study, files in studies.items():
            if not files:  # --ct 0 or --dx 0: that study is left out
                continue
            megabytes = sum(f.stat().st_size for f in files) / 1e6
            for associations in concurrency:
                pushes: dict[str, list[Push]] = {name: [] for name in names}
                for _ in range(args.repeat):  # interleaved, so all see the same machine load
                    for name in names:
                        pushes[name].append(
                            measure(TARGETS[name], scratch, files, associations, warm_ups[study])
                        )
                median = {
                    name: statistics.median(p.seconds for p in v) for name, v in pushes.items()
                }
                cpu = {name: cpu_per_instance(v, len(files)) for name, v in pushes.items()}
                rows.append((study, megabytes, associations, median, cpu))
                report_row(study, megabytes, associations, median, cpu)
        print()
        print("summary (throughput ratios; > 1 means cadnode is faster)")
        for study, _, associations, median, _ in rows:
            print(f"  {study:<22} {associations} assoc: " + ratios(median))
        print("CPU per instance, the node's over storescp's (< 1 means cadnode spends less)")
        for study, _, associations, _, cpu in rows:
            print(f"  {study:<22} {associations} assoc: " + cpu_ratios(cpu))


def cpu_per_instance(pushes: list[Push], instances: int) -> float | None:
    """The median of the pushes' CPU, in seconds per instance (None if it was not counted)."""
    spent = [p.cpu_seconds for p in pushes if p.cpu_seconds is not None]
    return statistics.median(spent) / instances if spent else None


def report_row(
    study: str,
    megabytes: float,
    associations: int,
    median: dict[str, float],
    cpu: dict[str, float | None],
) -> None:
    print(f"{study} ({megabytes:.0f} MB), {associations} association(s):")
    for name, value in median.items():
        used = cpu[name]
        spent = "" if used is None else f"  CPU {1000 * used:6.2f} ms per instance"
        print(f"  {name:<10} {value:7.2f} s  {megabytes / value:7.1f} MB/s{spent}")
    print("  " + ratios(median))
    print("  " + cpu_ratios(cpu))


def cpu_ratios(cpu: dict[str, float | None]) -> str:
    """Each cadnode's CPU per instance over storescp's (the receiving side's only)."""
    anchor = cpu.get("storescp")
    ours = {n: used for n, used in cpu.items() if n.startswith("cadnode") and used is not None}
    if anchor is None or not ours:
        return "CPU: not counted (needs storescp and a cadnode, and /proc)"
    return "  ".join(f"CPU {name}/storescp {used / anchor:.2f}x" for name, used in ours.items())


def ratios(median: dict[str, float]) -> str:
    """Each cadnode's throughput over each anchor's, and over receiving in one process."""
    ours = [name for name in median if name.startswith("cadnode")]
    anchors = [name for name in median if name not in ours]
    pairs = [(mine, name) for mine in ours for name in anchors]
    one = "cadnode-1p"
    pairs += [(mine, one) for mine in ours if mine != one and one in median]
    return "  ".join(f"{mine}/{name} {median[name] / median[mine]:.2f}x" for mine, name in pairs)


if __name__ == "__main__":
    main()
