"""Drift on a real `cadnode serve`, fed by DCMTK's storescu: two senders each send four
phantom chest films, then four more. One sender's second four come from another vendor's
detector (Manufacturer and PixelSpacing changed); the other's are the same kind of film. The
first raises a drift alert through the alert channel (a webhook receiver on loopback), once,
naming the sender, the engine, the attributes and their PSI, never the patient; the second
raises nothing. `cadnode engines drift`, /metrics and the engines page show the figures."""

from __future__ import annotations

import json
from pathlib import Path

from sqlmodel import select

from cadnode.admin.auth import hash_password
from cadnode.core.db import Alert, AlertKind, Database, DriftStat
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.alerting import webhook_receiver
from tests.peers import REPO, Cadnode, run_cadnode, storescu
from tests.peers import wait_for as wait
from tests.test_watch_node import PASSWORD, logged_in, told

SEEDS = (11, 12, 13, 14)
SHIFTED, STEADY = "CR-EAST", "CR-WEST"
PATIENT_NAME = "Drift^Patient"
DRIFTING = f"{SHIFTED}/cxr-ruleout"


def node_config(folder: Path, hook_url: str) -> Path:
    config = {
        "engines": {"dir": str(REPO / "engines")},
        "rules": str(REPO / "config" / "rules.yaml"),
        "storage": {"min_free_mb": 1},
        "http": {"admin_password_hash": hash_password(PASSWORD)},
        "alerts": {"check_every": "0.5s", "webhook_url": hook_url},
        # Four films make a window; the reference is each sender's first four. The training
        # population is left out: the shipped bundle's phantoms are not these films' mix.
        "drift": {
            "check_every": "1s",
            "min_images": 4,
            "reference_images": 4,
            "window_images": 4,
            "training": False,
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cadnode.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def films(folder: Path, sender: str, batch: int, *, other_vendor: bool = False) -> list[Path]:
    """Four films (the same phantoms in every batch, new patients and UIDs); from another
    vendor's detector with other_vendor."""
    written = []
    for seed in SEEDS:
        path = folder / f"{sender}-{batch}-{seed}.dcm"
        ds = write_chest_radiograph(
            path,
            seed=seed,
            patient_id=f"{sender}-{batch}-{seed}",
            patient_name=PATIENT_NAME,
            opacity=seed % 2 == 0,
        )
        if other_vendor:
            ds.Manufacturer = "Other Vendor"
            ds.ManufacturerModelName = "DR-9000"
            ds.ImagerPixelSpacing = ds.PixelSpacing = [0.2, 0.2]
            ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def send(node: Cadnode, sender: str, paths: list[Path]) -> None:
    done = storescu(node.dicom_port, *paths, calling_ae=sender)
    assert done.returncode == 0, done.stdout + done.stderr


def all_inferred(node: Cadnode, count: int) -> bool:
    """`count` jobs, each past infer (none failed)."""
    studies = node.studies()
    assert not [s for s in studies if s["state"] == "failed"], studies
    past = [s for s in studies if s["state"] not in ("received", "complete", "routed")]
    return len(past) >= count


def steady_compared(database: Database) -> bool:
    """A drift check has compared the steady sender's second four with its first four."""
    with database.session() as session:
        rows = session.exec(
            select(DriftStat).where(
                DriftStat.sender == STEADY,
                DriftStat.engine == "cxr-ruleout",
                DriftStat.against == "reference",
            )
        ).all()
    return bool(rows) and all(row.images == 4 for row in rows)


def test_a_sender_changing_detector_raises_a_drift_alert_and_a_steady_one_does_not(
    tmp_path: Path,
) -> None:
    with webhook_receiver() as (hook_url, hooked):
        config = node_config(tmp_path, hook_url)
        with run_cadnode(tmp_path / "node", None, CADNODE_CONFIG=str(config)) as node:
            for sender in (SHIFTED, STEADY):
                send(node, sender, films(tmp_path / "films", sender, 1))
            wait(lambda: all_inferred(node, 8), 120, "the reference films inferred")
            send(node, SHIFTED, films(tmp_path / "films", SHIFTED, 2, other_vendor=True))
            send(node, STEADY, films(tmp_path / "films", STEADY, 2))
            wait(
                lambda: told(hooked, "alert.raised", "engine.drift", DRIFTING),
                120,
                "the drift alert at the webhook",
                interval_s=0.2,
            )
            wait(lambda: all_inferred(node, 16), 120, "every film inferred")
            database = Database(node.data_dir / "cadnode.db")
            wait(lambda: steady_compared(database), 60, "a check of the steady sender")

            with database.session() as session:
                alerts = session.exec(select(Alert).where(Alert.kind == AlertKind.engine_drift))
                raised = {alert.subject: alert for alert in alerts}
            assert set(raised) == {DRIFTING}  # nothing of the steady sender, not even watched
            detail = raised[DRIFTING].detail
            assert f"on images from {SHIFTED}" in detail
            assert "manufacturer PSI" in detail and "pixel_spacing PSI" in detail
            print(f"alert {DRIFTING}: {detail}")  # shown with -s: a drift alert from a real run

            done = node.cli("engines", "drift", "cxr-ruleout", "--json")
            assert done.returncode == 0, done.stderr
            levels = {
                (r["sender"], r["attribute"], r["statistic"]): r for r in json.loads(done.stdout)
            }
            assert levels[(SHIFTED, "manufacturer", "psi")]["level"] == "alert"
            assert levels[(SHIFTED, "pixel_spacing", "psi")]["level"] == "alert"
            assert levels[(STEADY, "manufacturer", "psi")]["value"] == 0.0
            assert levels[(STEADY, "probability", "ks")]["p_value"] == 1.0  # the same answers
            print(node.cli("engines", "drift", "cxr-ruleout").stdout)

            with logged_in(node) as client:
                metrics = client.get("/metrics").text
                engines = client.get("/engines").text
            series = (
                'against="reference",attribute="manufacturer",'
                f'engine="cxr-ruleout",sender="{SHIFTED}"'
            )
            assert f"cadnode_drift_psi{{{series}}}" in metrics
            assert 'class="drift-alert"' in engines and SHIFTED in engines
            log = node.log_text()

    events = [(b["event"], b["kind"], b["subject"]) for _, b in hooked.received]
    assert events.count(("alert.raised", "engine.drift", DRIFTING)) == 1  # once, not per pass
    sent = json.dumps([body for _, body in hooked.received])
    for identifier in (PATIENT_NAME, f"{SHIFTED}-1-11", "Drift^"):
        assert identifier not in sent and identifier not in log
