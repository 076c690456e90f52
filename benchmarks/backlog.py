"""Backlog: a thousand chest studies pushed at once, every one processed, memory flat.

DCMTK storescu pushes N single-film chest studies (normal phantom films, 256x256 DX) to
cadnode over one association, as fast as it can; cadnode receives, routes, runs the
rule-out engine, writes an SR per study and delivers it to Orthanc. The figures:

- none lost: every study ends `delivered` and Orthanc holds exactly N SRs;
- throughput against the anchor measured in the same run: the same N films pushed straight
  into the same kind of Orthanc (what storing alone costs), as a ratio of seconds;
- memory: the daemon's resident set size, sampled every half second, at its peak against
  when the first tenth of the studies had been delivered (flat = close to 1).

    .venv/bin/python benchmarks/backlog.py [--studies 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.peers import Orthanc, run_cadnode, run_orthanc, wait_for


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
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - start


def stored(pacs: Orthanc) -> int:
    return int(pacs.get("/statistics")["CountInstances"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000)
    args = parser.parse_args()
    count = args.studies
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        films = []
        for i in range(count):
            path = folder / "films" / f"{i}.dcm"
            write_chest_radiograph(path, seed=20_000 + i, size=256)
            films.append(path)

        with run_orthanc(folder / "anchor") as anchor:
            direct = push(anchor.dicom_port, anchor.ae_title, films)
            wait_for(lambda: stored(anchor) >= count, 120, "the anchor to store every film")

        with run_orthanc(folder / "pacs") as pacs, \
                run_cadnode(folder / "cadnode", pacs.destination) as node:
            pid = node.process.pid
            samples: list[tuple[int, float]] = []  # (SRs in the PACS, resident MB)
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.5):
                    samples.append((stored(pacs), resident_mb(pid)))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            start = time.perf_counter()
            received = push(node.dicom_port, "CADNODE", films)
            wait_for(lambda: stored(pacs) >= count, 1800, "every SR in the PACS", 0.5)
            processed = time.perf_counter() - start
            done.set()
            sampler.join()
            # A job is `delivered` once dispatch has recorded every one of its deliveries.
            try:
                wait_for(
                    lambda: [r["state"] for r in node.studies()].count("delivered") == count,
                    120,
                    "every job recorded as delivered",
                    0.5,
                )
            except AssertionError as error:
                print(f"  {error}")
            states = [r["state"] for r in node.studies()]
            in_pacs = stored(pacs)  # anything sent twice would show now

    delivered = states.count("delivered")
    if delivered != count:
        print(f"  job states: {dict(Counter(states))}")
    early = next(mb for n, mb in samples if n >= count // 10)
    peak = max(mb for _, mb in samples)
    print(f"backlog: {count} chest studies pushed at once over one association")
    print(f"  received by cadnode in {received:.1f} s; every SR in Orthanc after {processed:.1f} s")
    print(f"  anchor, the films pushed straight into Orthanc: {direct:.1f} s")
    print(f"  ratio (cadnode push -> every SR stored / anchor store): {processed / direct:.2f}x")
    print(f"  studies delivered {delivered} of {count}; SRs in Orthanc {in_pacs} "
          f"(expected {count})")
    print(f"  resident memory: {early:.0f} MB at 10% delivered, peak {peak:.0f} MB "
          f"(ratio {peak / early:.2f}x)")
    assert delivered == count and in_pacs == count, "a study was lost or sent twice"


if __name__ == "__main__":
    main()
