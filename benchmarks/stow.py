"""STOW-RS ingest: a CT study stored by STOW-RS into cadnode and into Orthanc's DICOMweb
plugin, in the same run, as a throughput ratio.

The 300-instance 512x512 CT study (tests/synthetic.py) is encoded once as the
`multipart/related; type="application/dicom"` body each request sends (in one request, and
in requests of `--chunk` instances one after the other); each target starts empty for each
push, and must answer every instance stored and hold them all afterwards. Both answer only
once the instances are stored. The machines here are shared and noisy: the ratio in one run
is the figure, not the seconds.

    .venv/bin/python benchmarks/stow.py [--repeat 3] [--ct 300] [--size 512] [--chunk 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cadnode.admin.auth import hash_password
from tests.peers import REPO, port_open, run_cadnode, run_orthanc, wait_for
from tests.synthetic import write_ct_series

TOKEN = "benchmark-stow-token-" + "z" * 20


@dataclass
class Target:
    """A STOW-RS service ready for one push, and how many instances it holds."""

    studies_url: str
    headers: dict[str, str]
    stored: Callable[[], int]


TargetFactory = Callable[[Path], AbstractContextManager[Target]]


@contextmanager
def cadnode(folder: Path) -> Iterator[Target]:
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "dicomweb": {"clients": {"BENCH": hash_password(TOKEN)}},
    }
    (folder / "cadnode.yaml").write_text(json.dumps(config))  # JSON is YAML
    with run_cadnode(folder / "node", None, CADNODE_CONFIG=str(folder / "cadnode.yaml")) as node:
        wait_for(lambda: port_open(node.http_port), 30, "cadnode's HTTP port")
        spool = node.data_dir / "spool"
        yield Target(
            f"http://127.0.0.1:{node.http_port}/dicomweb/studies",
            {"Authorization": f"Bearer {TOKEN}"},
            lambda: sum(1 for _ in spool.rglob("*.dcm")),
        )


@contextmanager
def orthanc(folder: Path) -> Iterator[Target]:
    with run_orthanc(folder, dicomweb=True) as pacs:
        yield Target(
            f"{pacs.dicomweb_url}/studies",
            {},
            lambda: int(pacs.get("/statistics")["CountInstances"]),
        )


TARGETS: dict[str, TargetFactory] = {"cadnode": cadnode, "orthanc": orthanc}


def multipart(files: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex.encode()
    parts = [
        b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary, f.read_bytes())
        for f in files
    ]
    body = b"".join(parts) + b"--%s--\r\n" % boundary
    return body, f'multipart/related; type="application/dicom"; boundary={boundary.decode()}'


def push(target: Target, bodies: Bodies, instances: int) -> float:
    """Seconds for the requests, one after the other, each answered with all stored."""
    stored = 0
    start = time.perf_counter()
    for body, content_type in bodies:
        response = requests.post(
            target.studies_url,
            data=body,
            headers={
                **target.headers,
                "Content-Type": content_type,
                "Accept": "application/dicom+json",
            },
            timeout=600,
        )
        assert response.status_code == 200, f"{response.status_code}: {response.text[:500]}"
        stored += len(response.json()["00081199"]["Value"])
    elapsed = time.perf_counter() - start
    assert stored == instances, f"{stored} of {instances} answered stored"
    return elapsed


Bodies = list[tuple[bytes, str]]


def measure(factory: TargetFactory, scratch: Path, bodies: Bodies, n: int) -> float:
    with tempfile.TemporaryDirectory(dir=scratch) as folder, factory(Path(folder)) as target:
        seconds = push(target, bodies, n)
        # Every target must hold every instance: a fast one that drops data is no anchor.
        wait_for(lambda: target.stored() >= n, 60, "every instance to be stored")
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="pushes per figure (median)")
    parser.add_argument("--ct", type=int, default=300, help="CT instances")
    parser.add_argument("--size", type=int, default=512, help="CT rows and columns")
    parser.add_argument("--chunk", type=int, default=50, help="instances per request, chunked")
    parser.add_argument("--targets", default="cadnode,orthanc", help="comma-separated")
    args = parser.parse_args()
    names = args.targets.split(",")

    with tempfile.TemporaryDirectory(prefix="cadnode-stow-") as scratch_name:
        scratch = Path(scratch_name)
        files = write_ct_series(scratch / "ct", args.ct, size=args.size)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        ways = {
            "one request": [multipart(files)],
            f"requests of {args.chunk}": [
                multipart(files[i : i + args.chunk]) for i in range(0, len(files), args.chunk)
            ],
        }
        print(f"CT {args.ct} x {args.size}x{args.size} ({megabytes:.0f} MB) by STOW-RS")
        summary = []
        for way, bodies in ways.items():
            seconds: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(args.repeat):  # interleaved, so all see the same machine load
                for name in names:
                    seconds[name].append(measure(TARGETS[name], scratch, bodies, len(files)))
            median = {name: statistics.median(values) for name, values in seconds.items()}
            print(f"{way}:")
            for name, value in median.items():
                print(f"  {name:<8} {value:7.2f} s  {megabytes / value:7.1f} MB/s")
            if {"cadnode", "orthanc"} <= set(median):
                ratio = median["orthanc"] / median["cadnode"]
                summary.append(f"  {way:<16} cadnode/orthanc {ratio:.2f}x")
        print()
        print("summary (throughput ratio; > 1 means cadnode is faster)")
        print("\n".join(summary))


if __name__ == "__main__":
    main()
