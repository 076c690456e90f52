"""End-to-end latency: a chest radiograph pushed to cadnode -> its results stored in Orthanc.

Two kinds of film: a normal one (the rule-out filter rules it out: one SR) and one with a
pneumothorax (not ruled out, so the segmenter and the findings engine run too: the rule-out
SR, the SEG, the segmenter's SR and the findings SR; the time is until all four are stored).

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

from pydicom import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.peers import Orthanc, run_cadnode, run_orthanc, storescu, wait_for


def push_and_wait(
    port: int, called_ae: str, film: Path, study_uid: str, pacs: Orthanc, objects: int = 1
) -> float:
    start = time.perf_counter()
    done = storescu(port, film, called_ae=called_ae)
    assert done.returncode == 0, done.stderr
    wait_for(
        lambda: len(pacs.instances_of_study(study_uid)) >= objects,
        60,
        f"{objects} object(s) in Orthanc",
        0.01,
    )
    return time.perf_counter() - start


def summary(label: str, seconds: list[float]) -> str:
    return (
        f"  {label:<34} median {statistics.median(seconds):.3f} s, "
        f"p95 {percentile(seconds, 0.95):.3f} s"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="pushes per kind of film")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)

        def film(i: int, pneumothorax: bool = False) -> tuple[Path, Dataset]:
            path = folder / "films" / f"{i}.dcm"
            return path, write_chest_radiograph(
                path, seed=5000 + i, size=512, pneumothorax=pneumothorax
            )

        with run_orthanc(folder / "orthanc") as pacs, \
                run_cadnode(folder / "cadnode", pacs.destination) as node:
            # The first film of each kind warms caches on both sides.
            # A normal film: the rule-out SR; a pneumothorax: that, the segmenter's SEG and SR,
            # and the findings engine's SR.
            for path, ds, objects in ((*film(0), 1), (*film(1, pneumothorax=True), 4)):
                push_and_wait(node.dicom_port, "CADNODE", path, ds.StudyInstanceUID, pacs, objects)
            times: dict[str, list[float]] = {"normal": [], "pneumothorax": [], "direct": []}
            kinds = (("normal", False, 1), ("pneumothorax", True, 4))
            for i in range(args.count):  # interleaved, so all see the same machine load
                for kind, pneumothorax, objects in kinds:
                    path, ds = film(10 + 3 * i + pneumothorax, pneumothorax)
                    times[kind].append(push_and_wait(
                        node.dicom_port, "CADNODE", path, ds.StudyInstanceUID, pacs, objects
                    ))
                path, ds = film(12 + 3 * i)
                times["direct"].append(push_and_wait(
                    pacs.dicom_port, pacs.ae_title, path, ds.StudyInstanceUID, pacs
                ))
            states = {row["state"] for row in node.studies()}
    assert states == {"delivered"}, f"not every study was delivered: {states}"
    print(f"end-to-end, {args.count} chest radiographs of each kind (512x512 DX), storescu -> "
          "results stored in Orthanc")
    print(summary("normal film -> rule-out SR:", times["normal"]))
    print(summary("pneumothorax -> 2 SR + SEG:", times["pneumothorax"]))
    print(summary("anchor: push -> Orthanc:", times["direct"]))
    direct = statistics.median(times["direct"])
    for kind in ("normal", "pneumothorax"):
        ratio = statistics.median(times[kind]) / direct
        print(f"  ratio ({kind}, median end-to-end / median direct store): {ratio:.2f}x")


if __name__ == "__main__":
    main()
