"""What a publisher is given to send, and how it answers: one Notice per outbox row.

Channels (UPS events, UPS push, HL7, webhooks) never touch the database: the publish stage
reads the row, the decision and the workitem into a Notice, and records what happened.
"""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom import Dataset

from cadnode.core.db import Priority, PublicationChannel


class PublishError(Exception):
    """The recipient did not take it (unreachable, refused, a failure status): retry later."""


@dataclass(frozen=True)
class Notice:
    publication_id: int
    study_uid: str
    workitem: Dataset  # the study's UPS: identifiers, patient, current state and priority
    level: Priority | None = None  # the decision being published (None for a UPS event)
    previous: Priority | None = None
    reason: str = ""
    rule: str | None = None
    decided_at: dt.datetime | None = None
    payload: dict[str, Any] = field(default_factory=dict)  # a UPS event's type and information
    delivered_before: bool = False  # this recipient already has an earlier one for the study

    @property
    def accession_number(self) -> str:
        requests = self.workitem.get("ReferencedRequestSequence") or [Dataset()]
        return str(requests[0].get("AccessionNumber", ""))


class Link(Protocol):
    def send(self, notice: Notice) -> None:
        """Deliver one notice, or raise PublishError."""
        ...


class Channel(Protocol):
    name: PublicationChannel  # the Publication.channel of the rows it sends

    def connect(self, destination: str) -> AbstractContextManager[Link]:
        """A link to the destination for a batch of notices; PublishError if unreachable."""
        ...
