"""HL7 v2 pieces shared by the stages that speak it: MLLP framing, the character set, and
setting a field by its own datatype (prioritize sends orders; feedback receives reports)."""

from __future__ import annotations

from hl7apy.factories import datatype_factory

START, END = b"\x0b", b"\x1c\x0d"  # MLLP framing
UTF8 = "UNICODE UTF-8"  # HL7 table 0211


def set_value(element: object, value: str, version: str) -> None:
    """A typed value of the element's own datatype: hl7apy escapes |, ^, &, ~ and \\ in it
    instead of parsing them as delimiters."""
    if value:
        kind = element.datatype  # type: ignore[attr-defined]
        element.value = datatype_factory(kind, value, version=version)  # type: ignore[attr-defined]
