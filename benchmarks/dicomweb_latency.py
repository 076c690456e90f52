"""DICOMweb latency: a chest film pushed to cadnode -> its SR stored at the destination.

Three paths, interleaved in one run against one Orthanc (with its DICOMweb plugin, which
takes both C-STORE and STOW-RS):
- stow -> stow: the film by STOW-RS (dicomweb-client, bearer token) to the node's
  POST /dicomweb/studies; the SR by STOW-RS to Orthanc's /dicom-web (a `url` destination).
- dimse -> stow: the film by storescu; the SR by STOW-RS (the delivery leg alone changed).
- dimse -> dimse: the film by storescu; the SR by C-STORE (the anchor).
Two nodes run side by side: one whose destination is Orthanc's DICOMweb root, one whose is
its DICOM port. If the node's STOW-RS receive does not answer 200 for the first film, the
stow -> stow path is left out and the report says so. Figures: p50 and p95 of each path, and
the ratio of medians to the anchor (machines here are shared: absolute seconds mean little).

    .venv/bin/python benchmarks/dicomweb_latency.py [--count 20]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from pydicom import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicomweb_client.api import DICOMwebClient

from benchmarks.end_to_end import percentile
from cadnode.admin.auth import hash_password
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.peers import REPO, Cadnode, Orthanc, run_cadnode, run_orthanc, storescu, wait_for

CLIENT = "BENCH"


def node_config(folder: Path, destination: dict[str, object], token_hash: str) -> Path:
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "destinations": {"pacs": destination},
        "results": {"destinations": ["pacs"]},
        "dicomweb": {"clients": {CLIENT: token_hash}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cadnode.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def sr_stored(pacs: Orthanc, study_uid: str) -> bool:
    return any(
        pacs.instance_tags(i).get("Modality") == "SR" for i in pacs.instances_of_study(study_uid)
    )


def timed(push: Callable[[], None], pacs: Orthanc, film: Dataset) -> float:
    start = time.perf_counter()
    push()
    wait_for(lambda: sr_stored(pacs, film.StudyInstanceUID), 90, "the SR in Orthanc", 0.01)
    return time.perf_counter() - start


def by_storescu(node: Cadnode, path: Path) -> Callable[[], None]:
    def push() -> None:
        done = storescu(node.dicom_port, path)
        assert done.returncode == 0, done.stderr

    return push


def by_stow(client: DICOMwebClient, film: Dataset) -> Callable[[], None]:
    return lambda: client.store_instances([film])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="pushes per path")
    args = parser.parse_args()
    token = secrets.token_urlsafe(24)
    token_hash = hash_password(token)
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        folder = Path(scratch)
        pacs = stack.enter_context(run_orthanc(folder / "orthanc", dicomweb=True))
        web = {"url": pacs.dicomweb_url}
        dimse = {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
        stow_node, dimse_node = (
            stack.enter_context(
                run_cadnode(
                    folder / name,
                    None,
                    CADNODE_CONFIG=str(node_config(folder / name, destination, token_hash)),
                )
            )
            for name, destination in (("stow-out", web), ("dimse-out", dimse))
        )
        client = DICOMwebClient(
            url=f"http://127.0.0.1:{stow_node.http_port}/dicomweb",
            headers={"Authorization": f"Bearer {token}"},
        )
        seeds = iter(range(9000, 10**6))

        def film() -> tuple[Path, Dataset]:
            seed = next(seeds)
            path = folder / "films" / f"{seed}.dcm"
            return path, write_chest_radiograph(path, seed=seed, size=512)

        paths: dict[str, Callable[[Path, Dataset], Callable[[], None]]] = {
            "stow -> stow": lambda path, ds: by_stow(client, ds),
            "dimse -> stow": lambda path, ds: by_storescu(stow_node, path),
            "dimse -> dimse": lambda path, ds: by_storescu(dimse_node, path),
        }
        left_out = {}
        for name, make in list(paths.items()):  # warm-up, and the receive route's check
            path, ds = film()
            try:
                timed(make(path, ds), pacs, ds)
            except Exception as error:
                left_out[name] = f"{type(error).__name__}: {str(error)[:200]}"
                del paths[name]
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.count):  # interleaved, so all see the same machine load
            for name, make in paths.items():
                path, ds = film()
                times[name].append(timed(make(path, ds), pacs, ds))

    anchor = statistics.median(times["dimse -> dimse"]) if "dimse -> dimse" in times else None
    print(f"DICOMweb latency, film pushed -> its SR stored in Orthanc ({args.count} per path):")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        ratio = f", x{median / anchor:.2f} the DIMSE path" if anchor else ""
        print(f"  {name:<15} p50 {median:.3f} s, p95 {percentile(seconds, 0.95):.3f} s{ratio}")
    for name, why in left_out.items():
        print(f"  {name:<15} left out: {why}")


if __name__ == "__main__":
    main()
