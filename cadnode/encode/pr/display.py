"""How the source shows: its modality rescale, its window or VOI LUT and its polarity, copied
into the presentation state, which replaces the image's own for a viewer that applies it.

highdicom can derive these, but not every way a source gives them: it fails on a VOI LUT
whose entries are US values rather than OW bytes, labels a 12-bit LUT's entries 16-bit
without scaling them (the picture turns dark), refuses an image with both
a window and a VOI LUT, and a multi-frame image whose rescale is repeated per frame. So the
headers handed to highdicom are stripped of them (`strip_display`) and the modules are
written here from the sources, values copied as they are:

- Modality LUT: the rescale (or Modality LUT Sequence), from the top level or a multi-frame
  image's functional groups; it applies to every referenced image, so all must share it;
- Softcopy VOI LUT: the source's first window (the one a viewer shows first), else its first
  VOI LUT (entries widened to 16 bits when they are not 8 or 16 bits, as a presentation
  state requires), per image, or per frame of a multi-frame image; items list the images
  (frames) they apply to unless one applies to all;
- Presentation LUT Shape: INVERSE for MONOCHROME1 (a presentation state's pipeline ignores
  the photometric interpretation, so it must say bright is low), else IDENTITY.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np
from pydicom import Dataset
from pydicom.dataelem import DataElement

_RESCALE = ("RescaleIntercept", "RescaleSlope", "RescaleType")
_WINDOW = ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction")
_FRAME_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")

# A source's modality transform, comparable: ("rescale", slope, intercept, type), ("lut",
# descriptor, explanation, data), or () for none.
Modality = tuple[Hashable, ...]


def frame_count(source: Dataset) -> int:
    return int(source.get("NumberOfFrames", 1) or 1)


def display_key(source: Dataset) -> tuple[Hashable, ...]:
    """What images shown by one presentation state must share: polarity and rescale."""
    return (presentation_lut_shape(source), modality(source))


def presentation_lut_shape(source: Dataset) -> str:
    return "INVERSE" if source.get("PhotometricInterpretation") == "MONOCHROME1" else "IDENTITY"


def modality(source: Dataset) -> Modality:
    """The source's modality transform: its frames' (functional groups) else its own;
    ValueError when a multi-frame image's frames differ (a presentation state applies one
    rescale to all of them)."""
    frames = {
        _modality_of(item) for item in _frame_items(source, "PixelValueTransformationSequence")
    }
    frames.discard(())
    if len(frames) > 1:
        raise ValueError(
            "the frames of the image have different rescales: a presentation state applies "
            "one to all"
        )
    return frames.pop() if frames else _modality_of(source)


def _frame_items(source: Dataset, sequence: str) -> list[Dataset | None]:
    """Each frame's functional-group item of `sequence` (none for an image without groups)."""
    if not _has_groups(source):
        return []
    return [_frame_item(source, index, sequence) for index in range(frame_count(source))]


def _modality_of(item: Dataset | None) -> Modality:
    if item is None:
        return ()
    if item.get("ModalityLUTSequence"):
        lut = item.ModalityLUTSequence[0]
        return (
            "lut",
            tuple(lut.LUTDescriptor),
            lut.get("LUTExplanation", ""),
            _lut_data(lut),
            lut.get("ModalityLUTType", ""),
        )
    if "RescaleIntercept" in item and "RescaleSlope" in item:
        kind = str(item.get("RescaleType", "") or "US")  # US: unspecified, as DICOM says
        return ("rescale", str(item.RescaleSlope), str(item.RescaleIntercept), kind)
    return ()


def _lut_data(lut: Dataset) -> Hashable:
    data = lut.LUTData
    return data if isinstance(data, bytes) else tuple(int(v) for v in data)


def write_modality_lut(pr: Dataset, sources: Sequence[Dataset]) -> None:
    """The Modality LUT module: the one rescale (or LUT) every source shares."""
    found = {modality(source) for source in sources}
    if len(found) > 1:
        raise ValueError(
            "the images have different rescales: one presentation state shows images that share one"
        )
    transform = found.pop()
    if not transform:
        return
    if transform[0] == "rescale":
        _, slope, intercept, kind = transform
        pr.RescaleSlope, pr.RescaleIntercept, pr.RescaleType = slope, intercept, kind
        return
    source_lut = next(_source_modality_lut(source) for source in sources)
    pr.ModalityLUTSequence = [copy.deepcopy(source_lut)]


def _source_modality_lut(source: Dataset) -> Dataset:
    for item in [*_frame_items(source, "PixelValueTransformationSequence"), source]:
        if item is not None and item.get("ModalityLUTSequence"):
            lut: Dataset = item.ModalityLUTSequence[0]
            return lut
    raise ValueError("the image has no Modality LUT Sequence")


def softcopy_voi(sources: Sequence[Dataset]) -> list[Dataset]:
    """Softcopy VOI LUT Sequence items: each distinct window or LUT, with the images or
    frames it applies to (none listed when it applies to every one)."""
    applies: dict[Hashable, list[tuple[Dataset, int | None]]] = defaultdict(list)
    voi_items: dict[Hashable, Dataset] = {}
    for source in sources:
        frames: Sequence[int | None] = (
            range(1, frame_count(source) + 1) if _has_groups(source) else [None]
        )
        for frame in frames:
            voi = _voi(source, frame)
            if voi is None:
                continue
            key = _voi_key(voi)
            voi_items.setdefault(key, voi)
            applies[key].append((source, frame))
    everything = sum(frame_count(s) if _has_groups(s) else 1 for s in sources)
    items = []
    for key, targets in applies.items():
        item = voi_items[key]
        if len(targets) < everything:
            item.ReferencedImageSequence = _references(targets)
        items.append(item)
    return items


def _voi(source: Dataset, frame: int | None) -> Dataset | None:
    """A Softcopy VOI LUT item (without references) for the image or 1-based frame: its first
    window, else its first VOI LUT. A presentation state holds one of the two; of an image
    with both, the window is what cadnode's own pictures (overlay, Secondary Capture) show."""
    holder = source if frame is None else _frame_item(source, frame - 1, "FrameVOILUTSequence")
    holder = holder if holder is not None else source
    item = Dataset()
    if "WindowCenter" in holder and "WindowWidth" in holder:
        item.WindowCenter = _first(holder.WindowCenter)
        item.WindowWidth = _first(holder.WindowWidth)
        if holder.get("WindowCenterWidthExplanation"):
            item.WindowCenterWidthExplanation = _first(holder.WindowCenterWidthExplanation)
        if holder.get("VOILUTFunction"):
            item.VOILUTFunction = holder.VOILUTFunction
        return item
    if holder.get("VOILUTSequence"):
        item.VOILUTSequence = [_softcopy_lut(holder.VOILUTSequence[0])]
        return item
    return None


def _softcopy_lut(lut: Dataset) -> Dataset:
    """The image's VOI LUT for a presentation state, whose LUT entries must be 8 or 16 bits:
    as it is when they are, else widened to 16 bits with the values scaled to match (the
    pipeline reads an entry as a fraction of its bit range, so the picture is unchanged)."""
    copied = copy.deepcopy(lut)
    entries, first_mapped, bits = (int(v) for v in lut.LUTDescriptor)
    if bits in (8, 16):
        return copied
    values = np.asarray(_lut_values(lut), dtype=np.float64)
    widened = np.round(values * (0xFFFF / ((1 << bits) - 1))).clip(0, 0xFFFF)
    copied.LUTDescriptor = [entries, first_mapped, 16]
    copied["LUTData"] = DataElement(0x00283006, "OW", widened.astype("<u2").tobytes())
    return copied


def _lut_values(lut: Dataset) -> list[int]:
    data = lut.LUTData
    if isinstance(data, bytes):
        return [int(v) for v in np.frombuffer(data, dtype="<u2")]  # OW: 16-bit words
    return [int(v) for v in (data if isinstance(data, Sequence) else [data])]


def _voi_key(item: Dataset) -> Hashable:
    window = tuple(str(item.get(keyword, "")) for keyword in _WINDOW)
    if "VOILUTSequence" not in item:
        return window
    lut = item.VOILUTSequence[0]
    return (*window, tuple(lut.LUTDescriptor), lut.get("LUTExplanation", ""), _lut_data(lut))


def _first(value: object) -> object:
    """A multi-valued window's first value: the one a viewer shows by default."""
    return value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value


def _references(targets: list[tuple[Dataset, int | None]]) -> list[Dataset]:
    frames: dict[str, list[int]] = defaultdict(list)
    images: dict[str, Dataset] = {}
    for source, frame in targets:
        uid = str(source.SOPInstanceUID)
        images[uid] = source
        if frame is not None:
            frames[uid].append(frame)
    references = []
    for uid, source in images.items():
        item = Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = uid
        if frames[uid] and len(frames[uid]) < frame_count(source):
            item.ReferencedFrameNumber = frames[uid]
        references.append(item)
    return references


def strip_display(header: Dataset) -> None:
    """Remove the rescale, windows and LUTs from a header copy (top level and functional
    groups), so highdicom derives none of them (`softcopy_voi`, `write_modality_lut` do)."""
    for keyword in (*_RESCALE, *_WINDOW, "ModalityLUTSequence", "VOILUTSequence"):
        if keyword in header:
            delattr(header, keyword)
    for groups in _FRAME_GROUPS:
        for item in header.get(groups, []):
            for keyword in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
                if keyword in item:
                    delattr(item, keyword)


def _has_groups(source: Dataset) -> bool:
    return any(groups in source for groups in _FRAME_GROUPS)


def _frame_item(source: Dataset, index: int, sequence: str) -> Dataset | None:
    """The first item of a functional group `sequence` for 0-based frame `index`: per-frame,
    else shared, else None."""
    for groups, position in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = source.get(groups)
        if items is not None and len(items) > position:
            inner = items[position].get(sequence)
            if inner:
                item: Dataset = inner[0]
                return item
    return None
