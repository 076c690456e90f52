"""Worklist priority latency: the last image received -> the priority published.

For each chest radiograph, pushed alone with storescu: the clock starts when storescu
returns (its C-STORE answered, so the image is on disk and indexed, and the association
released: a few milliseconds later) and stops when
- a subscribed worklist client (pynetdicom UPS Event SCP) receives the N-EVENT-REPORT with
  the result's priority (HIGH or LOW), and
- the RIS (hl7apy's MLLP server) has parsed the order update and built its ACK.

Anchor, measured in the same run: the storescu push of the same film (association, one
C-STORE, release). Machines here are shared and noisy: the ratios are the figure.

    .venv/bin/python benchmarks/priority.py [--count 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.end_to_end import percentile
from cadnode.infer.phantoms.chest import write_chest_radiograph
from cadnode.prioritize.worklist import workitem_uid
from tests.peers import free_port, run_cadnode, storescu, wait_for
from tests.worklist_peers import MllpListener, WorklistClient, priority_config


def measure(
    port: int, film: Path, study_uid: str, client: WorklistClient, ris: MllpListener
) -> tuple[float, float, float]:
    """(push seconds, received -> UPS event, received -> HL7 ACK) for one film."""
    uid = workitem_uid(study_uid)
    start = time.perf_counter()
    done = storescu(port, film)
    received = time.perf_counter()
    assert done.returncode == 0, done.stderr
    event = client.wait_for_event(
        lambda e: e.workitem == uid and e.info.ScheduledProcedureStepPriority != "MEDIUM", 60
    )
    message = wait_for(
        lambda: next(
            (m for m in ris.messages if m.message.omi_o23_order.ipc.ipc_3.to_er7() == study_uid),
            None,
        ),
        60,
        "the HL7 order update",
        interval_s=0.005,
    )
    return received - start, event.at - received, message.at - received


def line(name: str, values: list[float], anchor: float) -> str:
    median = statistics.median(values)
    return (
        f"  {name:<34} median {median:.3f} s, p95 {percentile(values, 0.95):.3f} s"
        f"   ({median / anchor:.1f}x the push)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        films = []
        for i in range(args.count + 1):  # alternately abnormal (HIGH) and normal (LOW)
            path = folder / "films" / f"{i}.dcm"
            ds = write_chest_radiograph(path, seed=6000 + i, size=512, pneumothorax=i % 2 == 1)
            films.append((path, str(ds.StudyInstanceUID)))
        ris_port = free_port()
        with WorklistClient() as client:
            config = priority_config(folder / "cadnode", watcher=client, hl7_port=ris_port)
            ris = MllpListener(ris_port).start()
            try:
                with run_cadnode(folder / "cadnode", None, CADNODE_CONFIG=str(config)) as node:
                    assert client.subscribe(node.dicom_port) == 0
                    measure(node.dicom_port, *films[0], client, ris)  # warms both sides
                    runs = [measure(node.dicom_port, *f, client, ris) for f in films[1:]]
            finally:
                ris.stop()
    push, event, ack = (list(column) for column in zip(*runs, strict=True))
    anchor = statistics.median(push)
    print(
        f"worklist priority, {args.count} chest radiographs (512x512 DX, half abnormal), "
        "one at a time"
    )
    print(line("anchor: storescu push of the film", push, anchor))
    print(line("image received -> UPS event at SCU", event, anchor))
    print(line("image received -> HL7 ACK at RIS", ack, anchor))


if __name__ == "__main__":
    main()
