"""Sending held objects as C-STORE sub-operations (C-MOVE's and C-GET's), and counting them.

An object goes as it was stored: pydicom re-encodes a file read whole into the same bytes,
so the peer receives the dataset exactly as cadnode received (or made) it. Only when the
peer accepted no context for its transfer syntax is it converted: a compressed image is
decompressed (same SOP Instance UID: a change of transfer syntax is not a new object) and
pynetdicom re-encodes the uncompressed kinds among themselves. Decompression goes through
cadnode.dicom.pixels: an image over `limits.max_decoded_image_mb`, or whose codestream disagrees
with its dataset, is not decompressed (`retrieve.refused`). What cannot be read, converted
or sent fails its sub-operation, counted in the response and named in the Failed SOP
Instance UID List; the association goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext

from cadnode.dicom.pdu import tune_connection
from cadnode.dicom.pixels import ImageRefused, decompress
from cadnode.dicom.status import status_is_success
from cadnode.serve.index import Held, QueryIndex

log = structlog.get_logger("cadnode.serve")

C_STORE_RSP = 0x8001
MAXIMUM_CONTEXTS = 128  # presentation context IDs are odd numbers 1-255

Accepts = Callable[[str, UID], bool]


@dataclass
class Tally:
    """The outcome of each C-STORE sub-operation, from the peer's responses."""

    completed: int = 0
    warnings: int = 0
    failed: int = 0
    converted: int = 0
    unsendable: int = 0  # failed before a request went out (unreadable, no context)

    def on_response(self, event: Any) -> None:
        """Bound to EVT_DIMSE_RECV on the association that carries the sub-operations."""
        command = event.message.command_set
        if command.get("CommandField") != C_STORE_RSP:
            return
        status = int(command.Status)
        if status == 0x0000:
            self.completed += 1
        elif status_is_success(status):
            self.warnings += 1
        else:
            self.failed += 1

    def counts(self) -> dict[str, int]:
        return {
            "completed": self.completed,
            "warnings": self.warnings,
            "failed": self.failed + self.unsendable,
            "converted": self.converted,
        }


def accepted_by(association: Any) -> Accepts:
    """Whether `association` can carry an object of this SOP class in this transfer syntax,
    as is or by pynetdicom's own re-encoding among the uncompressed syntaxes."""

    def accepts(sop_class: str, syntax: UID) -> bool:
        for context in association.accepted_contexts if association is not None else []:
            if context.abstract_syntax != sop_class or not context.as_scu:
                continue
            agreed = UID(context.transfer_syntax[0])
            if agreed == syntax:
                return True
            if not (agreed.is_compressed or syntax.is_compressed) and (
                agreed.is_little_endian == syntax.is_little_endian
            ):
                return True
        return False

    return accepts


def proposed_contexts(held: Sequence[Held]) -> list[PresentationContext]:
    """For a C-MOVE's association: each object's own transfer syntax, and the uncompressed
    ones for conversion, per SOP class (one context per compressed syntax, so the peer's
    choice among them never forces a conversion)."""
    by_class: dict[str, list[UID]] = {}
    for item in held:
        syntaxes = by_class.setdefault(item.sop_class_uid, [])
        if UID(item.transfer_syntax) not in syntaxes:
            syntaxes.append(UID(item.transfer_syntax))
    contexts = []
    for sop_class, syntaxes in by_class.items():
        for syntax in syntaxes:
            if syntax.is_compressed:
                contexts.append(build_context(sop_class, syntax))
        uncompressed = [s for s in syntaxes if not s.is_compressed]
        fallback: list[str | UID] = list(
            dict.fromkeys([*uncompressed, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        )
        contexts.append(build_context(sop_class, fallback))
    return contexts[:MAXIMUM_CONTEXTS]


def sendable(index: QueryIndex, held: Held, accepts: Accepts, tally: Tally, limit: int) -> Dataset:
    """The object to send for one sub-operation, converted if the peer needs it to be; an
    image is decompressed only within `limit` bytes (cadnode.dicom.pixels)."""
    try:
        dataset = dcmread(index.file(held))
        syntax = UID(dataset.file_meta.TransferSyntaxUID)
    except Exception as error:
        log.warning(
            "retrieve.unreadable", held_as=held.held_as.value, path=held.path, reason=str(error)
        )
        tally.unsendable += 1
        return _unsendable(held)
    if accepts(held.sop_class_uid, syntax):
        return dataset
    converted = syntax.is_compressed and _decompressed(dataset, held, limit)
    if converted and accepts(held.sop_class_uid, UID(dataset.file_meta.TransferSyntaxUID)):
        tally.converted += 1
        return dataset
    tally.unsendable += 1
    return _unsendable(held)


def _decompressed(dataset: Dataset, held: Held, limit: int) -> bool:
    """Decompress in place; False (and why, logged) where it was refused or failed."""
    syntax = str(dataset.file_meta.TransferSyntaxUID)
    try:
        decompress(dataset, limit)
    except ImageRefused as refusal:
        log.warning(
            "retrieve.refused", held_as=held.held_as.value, syntax=syntax, reason=str(refusal)
        )
        return False
    except Exception as error:
        log.warning("retrieve.not_converted", syntax=syntax, reason=str(error))
        return False
    return True


def _unsendable(held: Held) -> Dataset:
    """A stand-in pynetdicom cannot send (it has no transfer syntax): it counts the
    sub-operation as failed and lists the SOP Instance UID, as the standard wants."""
    stand_in = Dataset()
    stand_in.SOPClassUID = held.sop_class_uid
    stand_in.SOPInstanceUID = held.sop_instance_uid
    return stand_in


def sub_association_handlers(tally: Tally, opened: list[Any]) -> list[Any]:
    """Handlers for C-MOVE's association to its destination: counts, and the association
    itself once accepted (pynetdicom opens it; its accepted contexts decide conversions)."""

    def on_accepted(event: Any) -> None:
        opened.append(event.assoc)

    return [
        (evt.EVT_CONN_OPEN, tune_connection),
        (evt.EVT_ACCEPTED, on_accepted),
        (evt.EVT_DIMSE_RECV, tally.on_response),
    ]
