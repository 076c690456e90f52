"""End-to-end latency: a chest radiograph pushed to cadnode -> its SR stored in Orthanc.

Anchor, measured in the same run: the same kind of film pushed straight into the same Orthanc
with the same storescu (what storing alone costs). The figure is the ratio of medians:
machines here are shared and noisy, so absolute seconds mean little.

    .venv/bin/python benchmarks/end_to_end.py [--count 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers import Orthanc, run_cadnode, run_orthanc, storescu, wait_for
from training.phantoms import write_chest_radiograph


def push_and_wait(port: int, called_ae: str, film: Path, study_uid: str, pacs: Orthanc) -> float:
    start = time.perf_counter()
    done = storescu(port, film, called_ae=called_ae)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: pacs.instances_of_study(study_uid), 60, "the object in Orthanc", 0.01)
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        films = []
        for i in range(2 * args.count + 1):
            path = folder / "films" / f"{i}.dcm"
            films.append((path, write_chest_radiograph(path, seed=5000 + i, size=512)))
        with run_orthanc(folder / "orthanc") as pacs, \
                run_cadnode(folder / "cadnode", pacs.destination) as node:
            warm_path, warm = films[0]  # the first film warms caches on both sides
            push_and_wait(node.dicom_port, "CADNODE", warm_path, warm.StudyInstanceUID, pacs)
            cadnode, direct = [], []
            for i in range(args.count):  # interleaved, so both see the same machine load
                path, ds = films[1 + 2 * i]
                cadnode.append(push_and_wait(node.dicom_port, "CADNODE", path,
                                             ds.StudyInstanceUID, pacs))
                path, ds = films[2 + 2 * i]
                direct.append(push_and_wait(pacs.dicom_port, pacs.ae_title, path,
                                            ds.StudyInstanceUID, pacs))
            states = {row["state"] for row in node.studies()}
    assert states == {"delivered"}, f"not every study was delivered: {states}"
    print(f"end-to-end, {args.count} chest radiographs (512x512 DX), storescu -> SR in Orthanc")
    print(f"  cadnode push -> SR stored:   median {statistics.median(cadnode):.3f} s, "
          f"p95 {percentile(cadnode, 0.95):.3f} s")
    print(f"  anchor push -> Orthanc:      median {statistics.median(direct):.3f} s, "
          f"p95 {percentile(direct, 0.95):.3f} s")
    ratio = statistics.median(cadnode) / statistics.median(direct)
    print(f"  ratio (median cadnode end-to-end / median direct store): {ratio:.2f}x")


if __name__ == "__main__":
    main()
