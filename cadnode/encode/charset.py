"""The source's text, as everything cadnode writes copies it: decoded, and written as UTF-8.

A source image may declare any Specific Character Set (0008,0005) the standard allows: one
value or several, with ISO 2022 code extensions, and a first value left empty for the
default repertoire (PS3.3 C.12.1.1.2), e.g. `\\ISO 2022 IR 87` in PS3.5 Annex H. highdicom
copies the source's declaration into the SEG, SR or Secondary Capture it builds and refuses
several valid ones (that empty first value, `ISO 2022 IR 149`, `ISO 2022 IR 58`, `ISO_IR 6`,
a lone `ISO 2022 IR 6`), so such a study got its finding and no result.

Carrying each declaration through would tie every result to what highdicom and each reader
support. Instead every result copies from `utf8_header(source)`: pydicom decodes each value
with the character sets in force where it stands (escape sequences, a sequence item's own
declaration), and the copy declares ISO_IR 192, in which any decoded character can be
written, so a name keeps all three component groups (alphabetic, ideographic, phonetic).
"""

from __future__ import annotations

from typing import Any

from pydicom import DataElement, Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import VR, PersonName

UTF8 = "ISO_IR 192"
_CHARACTER_SET = Tag(0x0008, 0x0005)
# Pixel Data and what follows it: a header never carries them (large, and not text).
_PIXEL_GROUP = 0x7FE0
# pydicom 3.0 leaves the ISO 2022 IR 58 designation (ESC $ ) A, PS3.5 Annex J.3) in what it
# decodes: it expects Python's codec to strip it, and gb2312 reads it as four ASCII
# characters. The characters after it are decoded right, so removing it keeps the meaning.
_UNSTRIPPED_ESCAPES = ("\x1b$)A",)


def utf8_header(source: Dataset) -> Dataset:
    """A copy of `source` without its pixel data, every text value decoded, declared UTF-8.

    Shares no item or value with `source`: writing or changing the copy leaves it alone.
    """
    header = _decoded(source, top_level=True)
    header.SpecificCharacterSet = UTF8
    return header


def _decoded(dataset: Dataset, *, top_level: bool = False) -> Dataset:
    copy = Dataset()
    for element in dataset:  # pydicom decodes each value on access
        if element.tag == _CHARACTER_SET:
            continue  # an item's own declaration too: the whole copy is UTF-8
        if top_level and element.tag.group >= _PIXEL_GROUP:
            continue
        copy.add(_copied(element))
    return copy


def _copied(element: DataElement) -> DataElement:
    if element.VR == VR.SQ:
        value: Any = [_decoded(item) for item in element.value]
    elif isinstance(element.value, MultiValue):
        value = [_text(item) for item in element.value]
    else:
        value = _text(element.value)
    return DataElement(element.tag, element.VR, value)


def _text(value: Any) -> Any:
    """A decoded value with no tie to the source's encoding; other values as they are."""
    if isinstance(value, PersonName):
        # A fresh name: the source's holds its encoded bytes and character sets.
        return PersonName(_unescaped(str(value)))
    if type(value) is str:  # not a UID or another str subclass, which are ASCII
        return _unescaped(value)
    return value


def _unescaped(text: str) -> str:
    for escape in _UNSTRIPPED_ESCAPES:
        text = text.replace(escape, "")
    return text
