"""DIMSE status codes (PS3.7 annex C and the service classes of PS3.4), named once.

pynetdicom names only success, pending, cancel and "move destination unknown"
(`pynetdicom.status.Status`); the codes cadnode answers or reads beyond those are here.
Codes only one service class uses (UPS's 0xC3xx) stay with that service.
"""

from __future__ import annotations

from pynetdicom.status import Status

SUCCESS = int(Status.SUCCESS)
PENDING = int(Status.PENDING)
PENDING_UNSUPPORTED_KEYS = 0xFF01  # C-FIND: an optional key was not supported
CANCEL = int(Status.CANCEL)

INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_INSTANCE = 0x0111
NO_SUCH_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
MISSING_ATTRIBUTE = 0x0120
SOP_CLASS_NOT_SUPPORTED = 0x0122  # referenced SOP class not supported
NO_SUCH_ACTION = 0x0123

OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # the dataset (or identifier) does not fit the SOP class
CANNOT_UNDERSTAND = 0xC000  # Q/R: unable to process
# STOW-RS to /studies/{study}: an instance of another study (in C000-CFFF, "cannot
# understand"; the code dcm4chee answers too).
DIFFERENT_STUDY = 0xC409


def status_is_success(status: int) -> bool:
    """Success, or a warning (0x0001, 0xB000-0xBFFF) under which the peer kept the object."""
    return status == SUCCESS or status == 0x0001 or 0xB000 <= status <= 0xBFFF
