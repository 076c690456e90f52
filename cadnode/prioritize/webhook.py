"""JSON webhooks: POST each priority change to an HTTP endpoint (httpx).

Any 2xx answer is delivery; anything else, or no answer, is retried through the outbox.
The `Idempotency-Key` header is the same on every retry of one notice, so a receiver that
saw it before can drop the repeat.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

from cadnode.core.config import WebhookPublisher
from cadnode.core.db import PublicationChannel
from cadnode.prioritize.notice import Link, Notice, PublishError


class WebhookChannel:
    name = PublicationChannel.webhook

    def __init__(self, publishers: Mapping[str, WebhookPublisher]) -> None:
        self.publishers = publishers

    @contextlib.contextmanager
    def connect(self, destination: str) -> Iterator[Link]:
        publisher = self.publishers.get(destination)
        if publisher is None:
            raise PublishError(f"webhook {destination!r} is no longer configured")
        with httpx.Client(timeout=publisher.timeout_s, headers=publisher.headers) as client:
            yield WebhookLink(client, publisher.url)


class WebhookLink:
    def __init__(self, client: httpx.Client, url: str) -> None:
        self.client = client
        self.url = url

    def send(self, notice: Notice) -> None:
        try:
            answer = self.client.post(
                self.url,
                json=document(notice),
                headers={"Idempotency-Key": f"cadnode-publication-{notice.publication_id}"},
            )
        except httpx.HTTPError as error:
            raise PublishError(f"webhook: {type(error).__name__}: {error}") from error
        if not answer.is_success:
            raise PublishError(f"webhook: HTTP {answer.status_code}")


def document(notice: Notice) -> dict[str, Any]:
    """The JSON body: what changed, why, and which study and order it is about."""
    return {
        "event": "priority.changed",
        "study_instance_uid": notice.study_uid,
        "accession_number": notice.accession_number,
        "workitem_uid": str(notice.workitem.SOPInstanceUID),
        "priority": notice.level.value if notice.level else None,
        "previous_priority": notice.previous.value if notice.previous else None,
        "reason": notice.reason,
        "rule": notice.rule,
        "decided_at": notice.decided_at.isoformat() if notice.decided_at else None,
    }
