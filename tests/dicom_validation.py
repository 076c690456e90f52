"""Validation of DICOM objects cadnode writes, for the tests (SR, SEG, ...).

`dciodvfy` (dicom3tools) checks a file against its IOD. It writes everything to stderr;
an error is a line `Error - ...` (sometimes after a tag, `(0x0008,0x0020) ... - Error - ...`),
a warning `Warning - ...`; a file it cannot read gives `Abort - ...`. The exit status is 1
when it found errors and 0 with only warnings, so the output is parsed rather than trusted.

A tool missing from PATH skips the test on a workstation but fails it under CI (env `CI`
set to anything but empty, 0 or false), so CI cannot go green by not validating.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import SegmentationStorage

_ERROR = re.compile(r"(^|\s-\s)(Error|Abort)\s+-")
_WARNING = re.compile(r"(^|\s-\s)Warning\s+-")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str) -> str:
    """The tool's path; else skip the test, or fail it when running under CI."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not on PATH (install dicom3tools to validate DICOM objects)"
    if in_ci():
        pytest.fail(f"{reason}; CI must validate, not skip", pytrace=False)
    pytest.skip(reason)


def dciodvfy_output(path: Path | str) -> tuple[int, list[str]]:
    """dciodvfy's exit status and its output lines (stdout then stderr)."""
    tool = require_tool("dciodvfy")
    done = subprocess.run(
        [tool, str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )
    lines = [line.rstrip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return done.returncode, lines


def dciodvfy_errors(path: Path | str) -> list[str]:
    """Every error dciodvfy reports for the file; empty when it is valid."""
    status, lines = dciodvfy_output(path)
    errors = [line for line in lines if _ERROR.search(line)]
    if status != 0 and not errors:
        errors.append(f"dciodvfy exited with status {status}: {' | '.join(lines[-5:])}")
    return errors


def dciodvfy_warnings(path: Path | str) -> list[str]:
    """The warnings dciodvfy reports for the file (acceptable, but worth a look)."""
    _, lines = dciodvfy_output(path)
    return [line for line in lines if _WARNING.search(line)]


def saved(ds: pydicom.Dataset, path: Path) -> Path:
    """`ds` written to `path` as a DICOM file (preamble and file meta); the path."""
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_valid(path: Path, allowed_warning: str | None = None) -> Path:
    """dciodvfy finds no error in the file, and no warning but those containing
    `allowed_warning` (none today otherwise; a new one deserves a look); the path."""
    errors = dciodvfy_errors(path)
    assert errors == [], errors  # (a helper module: pytest does not spell out its asserts)
    warnings = dciodvfy_warnings(path)
    print(f"dciodvfy {path.name}: 0 errors, {len(warnings)} warnings")
    unexpected = [w for w in warnings if allowed_warning is None or allowed_warning not in w]
    assert unexpected == [], unexpected
    return path


# dicom3tools here (1.00~20220618) predates Supplement 243 (Label Map Segmentation, 2024):
# it knows no Label Map Segmentation Storage SOP Class, so it checks no IOD, and it checks
# Segment Numbers by the binary rules, though a labelmap must describe its background value 0
# as a segment. Those are all it may say of a labelmap SEG.
UNKNOWN_IOD = "Information Object Not found"
BACKGROUND_SEGMENT = "SegmentNumber not monotonically increasing from one by one - have "
# Checked as a Segmentation Storage instance instead (the IOD it knows), these are the
# differences Sup 243 made: LABELMAP, segment 0, no Segment Identification per frame.
SUP_243_CHANGES = (
    BACKGROUND_SEGMENT,
    "Unrecognized enumerated value <LABELMAP> for value 1 of attribute <Segmentation Type>",
    "Value is zero for value 1 of attribute <Segment Number>",
    "Missing attribute Type 1 Required Element=<SegmentIdentificationSequence>",
)


def assert_valid_labelmap(path: Path) -> Path:
    """dciodvfy says nothing of the labelmap SEG but what it says of any Sup 243 object."""
    errors = dciodvfy_errors(path)
    assert any(UNKNOWN_IOD in error for error in errors), errors
    assert [e for e in errors if UNKNOWN_IOD not in e and BACKGROUND_SEGMENT not in e] == []
    as_segmentation = pydicom.dcmread(path)
    as_segmentation.SOPClassUID = SegmentationStorage
    as_segmentation.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    copy = saved(as_segmentation, path.with_name(f"{path.stem}-as-binary-era.dcm"))
    unexplained = [e for e in dciodvfy_errors(copy) if not any(c in e for c in SUP_243_CHANGES)]
    assert unexplained == []
    assert dciodvfy_warnings(copy) == []
    return path
