"""Publish: the worklist outbox. Send every queued priority change and UPS event report.

Rows are sent in the order they were queued, per recipient and study: a study's later
notice never overtakes an earlier one still waiting for its retry. A failed attempt is
recorded through the outbox (cadnode/deliver/outbox.py): retried with the back-off it is
given (the node's outbox schedule, `dispatch.backoff_*`; kept in the database, so across
restarts) and dead-lettered after its `max_attempts`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import structlog
from sqlmodel import Session, col, select

from cadnode.core.backoff import Backoff
from cadnode.core.claims import worker_for
from cadnode.core.db import (
    Database,
    Priority,
    Publication,
    PublicationChannel,
    PublicationState,
    Study,
    StudyPriority,
    utcnow,
)
from cadnode.core.locks import named_lock
from cadnode.deliver.outbox import record_failure, record_sent
from cadnode.prioritize import worklist
from cadnode.prioritize.notice import Channel, Notice, PublishError

log = structlog.get_logger("cadnode.prioritize.publish")


class Publisher:
    name = "publish"

    def __init__(
        self,
        database: Database,
        channels: Mapping[PublicationChannel, Channel],
        backoff: Backoff,
    ) -> None:
        self.database = database
        self.channels = channels
        self.backoff = backoff
        self.worker = worker_for(database)

    def advance(self) -> float | None:
        with self.database.session() as session:
            # One publisher among every node's at a time keeps each recipient's order; each
            # row is claimed too, so none is sent twice should that lock ever be lost.
            with named_lock(self.database, "publish").if_free() as mine:
                if mine:
                    self._publish(session)
            upcoming = session.exec(
                select(Publication.next_attempt_at)
                .where(Publication.state == PublicationState.pending)
                .order_by(col(Publication.next_attempt_at))
            ).first()
        return None if upcoming is None else max((upcoming - utcnow()).total_seconds(), 0.0)

    def _publish(self, session: Session) -> None:
        due = self._due(session)
        wanted = [row.id for rows in due.values() for row in rows]
        if not wanted:
            return
        claimed = {
            row.id: row
            for row in self.worker.claim(session, Publication, col(Publication.id).in_(wanted))
        }
        for (channel, destination), rows in due.items():
            mine = [claimed[row.id] for row in rows if row.id in claimed]
            if mine:
                self._send(session, channel, destination, mine)
        left = [row_id for row_id in claimed if self.worker.holds(Publication, row_id)]
        self.worker.release(session, Publication, left)

    def _due(self, session: Session) -> dict[tuple[PublicationChannel, str], list[Publication]]:
        """Pending rows that are due, by recipient, without letting one overtake an earlier
        row of the same study and recipient that is still waiting."""
        now = utcnow()
        waiting: set[tuple[PublicationChannel, str, int]] = set()
        due: dict[tuple[PublicationChannel, str], list[Publication]] = defaultdict(list)
        pending = session.exec(
            select(Publication)
            .where(Publication.state == PublicationState.pending)
            .order_by(col(Publication.id))
        )
        for row in pending:
            key = (row.channel, row.destination, row.study_id)
            if key in waiting:
                continue
            if row.next_attempt_at > now:
                waiting.add(key)
                continue
            due[(row.channel, row.destination)].append(row)
        return due

    def _send(
        self,
        session: Session,
        channel: PublicationChannel,
        destination: str,
        rows: list[Publication],
    ) -> None:
        sender = self.channels.get(channel)
        if sender is None:
            for row in rows:
                self._failed(session, row, f"no {channel.value} publisher is configured")
            return
        failed_studies: set[int] = set()
        try:
            with sender.connect(destination) as link:
                for row in rows:
                    if row.study_id in failed_studies:
                        continue
                    try:
                        link.send(self._notice(session, row))
                    except Exception as error:  # a publisher's fault must not stop the others
                        failed_studies.add(row.study_id)
                        self._failed(session, row, _describe(error))
                    else:
                        self._sent(session, row)
        except Exception as error:  # could not connect (or the link broke): the rest wait
            session.rollback()  # a failed commit must not keep the session from recording
            for row in rows:
                if row.state is PublicationState.pending and row.study_id not in failed_studies:
                    self._failed(session, row, _describe(error))

    def _notice(self, session: Session, row: Publication) -> Notice:
        study = session.get(Study, row.study_id)
        item = worklist.workitem_of_study(session, row.study_id)
        assert study is not None and item is not None and row.id is not None
        decision = session.get(StudyPriority, row.decision_id) if row.decision_id else None
        previous = None
        if decision is not None:
            previous = session.exec(
                select(StudyPriority.level)
                .where(
                    StudyPriority.study_id == row.study_id,
                    col(StudyPriority.id) < decision.id,
                )
                .order_by(col(StudyPriority.id).desc())
            ).first()
        delivered_before = (
            session.exec(
                select(Publication.id).where(
                    Publication.study_id == row.study_id,
                    Publication.channel == row.channel,
                    Publication.destination == row.destination,
                    Publication.state == PublicationState.sent,
                )
            ).first()
            is not None
        )
        return Notice(
            publication_id=row.id,
            study_uid=study.study_uid,
            workitem=worklist.dataset_of(item),
            level=decision.level if decision else None,
            previous=Priority(previous) if previous else None,
            reason=decision.reason if decision else "",
            rule=decision.rule if decision else None,
            decided_at=decision.decided_at if decision else None,
            payload=row.payload,
            delivered_before=delivered_before,
        )

    def _sent(self, session: Session, row: Publication) -> None:
        record_sent(row)
        if not self.worker.settle(session, row):
            return  # its lease ran out meanwhile: whoever took it sends it again
        log.info(
            "publication.sent",
            publication=row.id,
            study=row.study_id,
            channel=row.channel,
            destination=row.destination,
            attempts=row.attempts,
        )

    def _failed(self, session: Session, row: Publication, reason: str) -> None:
        dead = record_failure(row, reason, self.backoff)
        self.worker.settle(session, row)  # and free it for whoever tries next
        log.warning(
            "publication.dead_lettered" if dead else "publication.retry_scheduled",
            publication=row.id,
            study=row.study_id,
            channel=row.channel,
            destination=row.destination,
            attempts=row.attempts,
            reason=reason,
        )


def _describe(error: Exception) -> str:
    return str(error) if isinstance(error, PublishError) else f"{type(error).__name__}: {error}"
