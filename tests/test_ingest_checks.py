"""The receive checks' memory of values that decoded, and what they decoded to: it saves
work, never a check."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from cadnode.ingest import checks


def element(group: int, number: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a short length."""
    return struct.pack("<HH", group, number) + vr.encode() + struct.pack("<H", len(value)) + value


def header(instance_number: bytes, charset: bytes = b"ISO_IR 100") -> Dataset:
    encoded = (
        element(0x0008, 0x0005, "CS", charset)
        + element(0x0008, 0x0060, "CS", b"CT")
        + element(0x0010, 0x0010, "PN", b"Doe^Jane")
        + element(0x0020, 0x0013, "IS", instance_number)
    )
    return read_dataset(BytesIO(encoded), is_implicit_VR=False, is_little_endian=True)


@pytest.fixture
def converted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The elements pydicom converts, by tag, as the checks ask for them."""
    monkeypatch.setattr(checks, "_decoded", checks._Decoded(8192))
    seen: list[int] = []
    original = Dataset.__getitem__

    def counting(self: Dataset, key: object) -> object:
        seen.append(int(key))  # type: ignore[call-overload]
        return original(self, key)  # type: ignore[index]

    monkeypatch.setattr(Dataset, "__getitem__", counting)
    yield seen


def test_a_value_that_decoded_once_is_not_converted_again(converted: list[int]) -> None:
    assert checks.undecodable(header(b"1 ")) is None
    assert set(converted) == {0x00080005, 0x00080060, 0x00100010, 0x00200013}
    converted.clear()
    assert checks.undecodable(header(b"2 ")) is None
    assert set(converted) == {0x00200013}  # only the value that changed


def test_the_same_bytes_under_another_character_set_are_converted_again(
    converted: list[int],
) -> None:
    assert checks.undecodable(header(b"1 ")) is None
    converted.clear()
    assert checks.undecodable(header(b"1 ", charset=b"ISO_IR 192")) is None
    assert 0x00100010 in converted and 0x00080060 in converted


def test_a_value_that_does_not_decode_is_refused_after_good_ones_of_its_tag(
    converted: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert checks.undecodable(header(b"1 ")) is None
    original = Dataset.__getitem__

    def failing(self: Dataset, key: object) -> object:
        if int(key) == 0x00200013 and self.get_item(0x00200013).value == b"bad ":  # type: ignore[call-overload]
            raise ValueError("not an integer string")
        return original(self, key)  # type: ignore[index]

    monkeypatch.setattr(Dataset, "__getitem__", failing)
    assert (
        checks.undecodable(header(b"bad ")) == "(0020,0013) IS value does not decode (ValueError)"
    )
    assert checks.undecodable(header(b"1 ")) is None  # the good one is still known good


def test_the_memory_is_bounded() -> None:
    decoded = checks._Decoded(4)
    for index in range(10):
        decoded.add((index,), index)
    assert decoded.get((9,)) == 9 and decoded.get((0,)) is checks._ABSENT
    assert len(decoded._values) <= 4


def test_values_read_after_the_checks_are_the_values_they_decoded(converted: list[int]) -> None:
    tags = [0x00080060, 0x00200013, 0x00100020]  # Modality, Instance Number, an absent one
    assert checks.undecodable(header(b"1 ")) is None
    converted.clear()

    dataset = header(b"7 ")
    assert checks.undecodable(dataset) is None
    assert checks.values_of(dataset, tags) == ["CT", 7, None]
    assert set(converted) == {0x00200013}  # Modality's value came from the memory
    assert checks.values_of(header(b"7 ", charset=b"ISO_IR 192"), tags) == ["CT", 7, None]
