"""The DIMSE services stages serve on the node's one DICOM port, routed by SOP class."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Service:
    """A DIMSE service another stage serves on the node's DICOM port (e.g. the UPS worklist).

    `handlers` maps pynetdicom intervention events (evt.EVT_C_FIND, evt.EVT_N_GET, ...) to
    the service's handler; receive binds one handler per event that routes each request to
    the service owning its presentation context, so several services may share an event.
    """

    name: str
    sop_classes: tuple[str, ...]
    handlers: Mapping[Any, Callable[[Any], Any]]


def routed_handlers(services: Sequence[Service]) -> list[tuple[Any, Callable[[Any], Any]]]:
    """(event, handler) pairs for `AE.start_server`, routing by the context's SOP class."""
    routes: dict[Any, dict[str, Callable[[Any], Any]]] = {}
    for service in services:
        for event, handler in service.handlers.items():
            for sop_class in service.sop_classes:
                routes.setdefault(event, {})[sop_class] = handler

    def route(by_class: dict[str, Callable[[Any], Any]]) -> Callable[[Any], Any]:
        def handle(event: Any) -> Any:
            handler = by_class.get(str(event.context.abstract_syntax))
            if handler is None:  # pynetdicom answers an exception with a failure status
                raise LookupError(f"no handler for {event.context.abstract_syntax}")
            return handler(event)

        return handle

    return [(event, route(by_class)) for event, by_class in routes.items()]
