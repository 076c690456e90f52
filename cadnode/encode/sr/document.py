"""The SR document around a finished content tree, built without copying the tree.

highdicom's SR constructor deep-copies the whole content tree to parse the copy into its
`content` view, then walks the tree again, building a highdicom object per content item,
to check that every image or object it references is listed as evidence. That was about
three quarters of building a one-film report (profiled; 27 of the 43 ms a film's SR cost in
the backlog benchmark was the copy), and the copy feeds only `content`, which cadnode never
reads.

So `report_document` hands highdicom a shell of the root (its own attributes, an empty
Content Sequence), then attaches the real Content Sequence element and makes the evidence
check itself, with a plain walk. Everything else is highdicom's constructor, unchanged:
the bytes are those the constructor makes from the whole tree (tests/test_sr_document.py
compares them for every kind of report). `content` is parsed from the finished document
when asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import highdicom as hd
import pydicom
from pydicom.tag import Tag

_CONTENT_SEQUENCE = Tag("ContentSequence")
# The content items that reference another SOP instance whose evidence highdicom checks.
_REFERENCING = {"IMAGE", "COMPOSITE"}


class ReportDocument(hd.sr.Comprehensive3DSR):
    """A Comprehensive 3D SR whose content tree was attached, not copied (see the module)."""

    @property
    def content(self) -> hd.sr.ContentSequence:
        # Parsed from a copy on demand: what highdicom's constructor parses eagerly.
        return hd.sr.Comprehensive3DSR.from_dataset(self, copy=True).content


def report_document(
    evidence: Sequence[pydicom.Dataset], root: pydicom.Dataset, **attributes: Any
) -> ReportDocument:
    """`hd.sr.Comprehensive3DSR(evidence, root, **attributes)`, with `root`'s Content
    Sequence attached as it is (the document shares it). Raises ValueError, as highdicom
    does, when the tree references an instance that `evidence` lacks."""
    _check_evidence(evidence, root)
    shell = pydicom.Dataset()
    for element in root:
        if element.tag != _CONTENT_SEQUENCE:
            shell.add(element)
    shell.ContentSequence = []
    document = ReportDocument(evidence=evidence, content=shell, **attributes)
    document[_CONTENT_SEQUENCE] = root[_CONTENT_SEQUENCE]
    return document


def _check_evidence(evidence: Sequence[pydicom.Dataset], root: pydicom.Dataset) -> None:
    listed = {str(item.SOPInstanceUID) for item in evidence}
    missing = sorted(set(_referenced(root)) - listed)
    if missing:
        raise ValueError(
            "No evidence was provided for the following SOP instances, which are referenced "
            f"in the document content: {', '.join(missing)}"
        )


def _referenced(item: pydicom.Dataset) -> Iterator[str]:
    """The SOP Instance UIDs that the content items below `item` reference."""
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") in _REFERENCING:
            for reference in child.get("ReferencedSOPSequence", []):
                yield str(reference.ReferencedSOPInstanceUID)
        yield from _referenced(child)
