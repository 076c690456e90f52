"""Storage Commitment with Orthanc as the PACS: cadnode asks (N-ACTION) after the C-STORE,
Orthanc answers (N-EVENT-REPORT) on an association it opens to cadnode's DICOM port."""

from __future__ import annotations

import json
from pathlib import Path

from tests.peers import free_port, run_cadnode, run_orthanc, wait_for
from tests.test_delivery_outage import deliveries, outbox, outbox_config, push_films


def test_orthanc_confirms_it_keeps_the_result(tmp_path: Path) -> None:
    node_port = free_port()
    # Orthanc sends its answer to the AE that asked, so it must know where that AE listens.
    known = {"DicomModalities": {"cadnode": ["CADNODE", "127.0.0.1", node_port]}}
    with run_orthanc(tmp_path / "orthanc", extra=known) as pacs:
        config = outbox_config(tmp_path, pacs.dicom_port, max_attempts=5)
        settings = json.loads(config.read_text())
        settings["destinations"]["pacs"]["storage_commitment"] = True
        config.write_text(json.dumps(settings))
        env = {"CADNODE_CONFIG": str(config), "CADNODE_DICOM_PORT": str(node_port)}
        with run_cadnode(tmp_path / "node", None, **env) as node:
            [film] = push_films(node, tmp_path, range(801, 802))
            wait_for(
                lambda: [r["commitment"] for r in outbox(node)] == ["committed"],
                60,
                "Orthanc's storage commitment report",
                interval_s=0.2,
            )
            [row] = deliveries(node)
            assert len(pacs.instances_of_study(film.StudyInstanceUID)) == 1
            log = node.log_text()
    assert row["state"] == "sent" and row["commitment_requests"] == 1
    assert row["committed_at"] >= row["sent_at"] and row["commitment_failure"] is None
    assert row["commitment_transaction_uid"]
    assert '"event": "delivery.commitment_requested"' in log
    assert '"event": "delivery.committed"' in log
