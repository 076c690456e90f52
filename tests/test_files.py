from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cadnode.core import files
from cadnode.core.files import is_temporary, is_valid_uid, write_aside, write_durably


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


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 525_000, 5 * 2**20])
def test_a_file_written_aside_holds_its_chunks_exactly(tmp_path: Path, size: int) -> None:
    """The bytes exactly, whatever the chunks' boundaries; the folders made as needed."""
    data = os.urandom(size)
    cuts = sorted({0, size, size // 3, size // 3 + 1, min(size, 132)})
    chunks = [memoryview(data)[a:b] for a, b in itertools.pairwise(cuts)]
    target = tmp_path / "new" / "series" / "x.dcm"  # its folders made as needed
    temporary, written = write_aside(target, chunks)
    assert written == size and temporary.parent == target.parent
    assert is_temporary(temporary) and temporary.read_bytes() == data


def test_a_temporary_name_already_taken_is_refused_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer's temporary is never written over, renamed into place or removed."""
    target = tmp_path / "x.dcm"
    taken = tmp_path / ".x.dcm.0000000000000000.part"
    taken.write_bytes(b"another writer's bytes")
    monkeypatch.setattr(files, "_temporary_name", lambda _path: taken)
    with pytest.raises(FileExistsError):
        write_durably(target, [b"ours"])
    with pytest.raises(FileExistsError):
        write_aside(target, [b"ours"])
    assert taken.read_bytes() == b"another writer's bytes" and not target.exists()
