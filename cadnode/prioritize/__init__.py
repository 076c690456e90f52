"""Worklist priority: from results to the radiologists' reading worklists.

    results --> prioritize (policy.py, stage.py) --> workitem + outbox --> publish (publish.py)
                                                                 --> UPS event reports, UPS push
                                                                 --> HL7 order updates, webhooks
    worklist clients --C-FIND / N-GET / N-SET / N-ACTION--> ups.py (on the node's DICOM port)

`Prioritization` builds the two stages and the UPS service from the settings, for the daemon.
"""

from __future__ import annotations

from cadnode.core.config import Settings
from cadnode.core.db import Database
from cadnode.core.runner import Stage
from cadnode.dicom.services import Service
from cadnode.prioritize.hl7 import Hl7Channel
from cadnode.prioritize.notice import Channel
from cadnode.prioritize.policy import load_policy
from cadnode.prioritize.publish import Publisher
from cadnode.prioritize.stage import Prioritizer
from cadnode.prioritize.ups import UpsScp
from cadnode.prioritize.ups_notify import UpsEventChannel, UpsPushChannel
from cadnode.prioritize.webhook import WebhookChannel


class Prioritization:
    def __init__(self, settings: Settings, database: Database) -> None:
        priority = settings.priority
        self.policy = load_policy(priority.policy_file)
        by_ae_title = {d.ae_title: d for d in settings.dicom_destinations().values()}
        ae_title, timeout_s = settings.dicom.ae_title, settings.dispatch.timeout_s
        senders: list[Channel] = [
            UpsEventChannel(ae_title, by_ae_title, timeout_s),
            UpsPushChannel(ae_title, settings.dicom_destinations(), timeout_s),
            Hl7Channel(priority.hl7),
            WebhookChannel(priority.webhooks),
        ]
        # Keyed by each sender's own channel, so a row's channel always finds its sender.
        channels = {sender.name: sender for sender in senders}
        self.stages: list[Stage] = [
            Prioritizer(database, settings.storage.spool, self.policy, priority, ae_title),
            # Publications are an outbox like deliveries: the same retry schedule.
            Publisher(database, channels, settings.dispatch.backoff),
        ]
        self.services = ups_services(settings, database)


def ups_services(settings: Settings, database: Database) -> list[Service]:
    """The UPS worklist on the node's DICOM port, if enabled (built in every receiver process)."""
    if not settings.priority.ups.enabled:
        return []
    by_ae_title = {d.ae_title: d for d in settings.dicom_destinations().values()}
    return [UpsScp(database, by_ae_title, settings.priority.ups.turnaround).service()]
