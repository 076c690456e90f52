from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cadnode.core.files import is_valid_uid, write_durably


def test_writes_all_chunks_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.dcm"
    assert write_durably(target, [b"DICM", b"-body"]) == 9
    assert target.read_bytes() == b"DICM-body"
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.dcm"]


def test_a_failed_write_leaves_the_old_file_whole_and_no_debris(tmp_path: Path) -> None:
    target = tmp_path / "x.dcm"
    target.write_bytes(b"old")

    def failing() -> Iterator[bytes]:
        yield b"new, half"
        raise OSError("disk went away")

    with pytest.raises(OSError):
        write_durably(target, failing())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.1", "2.25.1234567890", "0.1"])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid", ["", "../../etc/passwd", "1.2.", "1..2", "1.02", "1.2.3a", "1." + "1" * 64, None, 12]
)
def test_invalid_uids_never_become_paths(uid: object) -> None:
    assert not is_valid_uid(uid)
