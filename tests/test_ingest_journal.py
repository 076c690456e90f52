"""The spool's journal (cadnode/ingest/journal.py): after a kill or a power cut, every whole
record is replayed and a record cut anywhere is dropped, so nothing acknowledged is lost and
nothing half-written is indexed."""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage

from cadnode.core.db import Database
from cadnode.ingest.journal import (
    HEADER,
    LEGACY_HEADER,
    LEGACY_MAGIC,
    SPARE_SUFFIX,
    SUFFIX,
    Journal,
    journal_folder,
    record_chunks,
    records,
    recover,
    segment_generation,
)
from cadnode.ingest.spool import Arrival, Spool, examine
from tests.synthetic import write_image


def segments(spool: Path) -> list[Path]:
    return sorted(journal_folder(spool).glob(f"*{SUFFIX}"))


def test_a_segment_cut_at_every_byte_of_its_last_record_keeps_exactly_the_whole_ones(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    journal = Journal(spool, idle_s=3600)  # no checkpoint while the test reads the segment
    written = [(Path(f"1.2/3.4/{n}.dcm"), os.urandom(size)) for n, size in enumerate((90, 1, 60))]
    for path, body in written:
        journal.write(path, [body[:10], body[10:]])  # chunks, as receive gives them
    [segment] = segments(spool)
    data = segment.read_bytes()
    last_path, last_body = written[-1]
    last_start = len(data) - (HEADER.size + len(str(last_path)) + len(last_body))

    for cut in range(last_start, len(data) + 1):
        found = [(path, bytes(body)) for path, body, _ in records(data[:cut])]
        assert found == (written if cut == len(data) else written[:-1]), f"cut at {cut}"
    journal.close()
    assert not segments(spool)


def test_a_record_whose_bytes_changed_ends_the_replay(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "spool", idle_s=3600)
    for n in range(3):
        journal.write(Path(f"a/{n}.dcm"), [bytes([n]) * 100])
    [segment] = segments(tmp_path / "spool")
    data = bytearray(segment.read_bytes())
    data[-50] ^= 0xFF  # the last record's body, as a power cut may leave it (blocks unwritten)
    assert [str(path) for path, _, _ in records(bytes(data))] == ["a/0.dcm", "a/1.dcm"]
    data[:4] = b"XXXX"  # and a segment whose first block does not check: nothing
    assert list(records(bytes(data))) == []
    journal.close()


def test_a_record_naming_a_place_outside_the_spool_is_not_replayed(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "spool", idle_s=3600)
    journal.write(Path("a/ok.dcm"), [b"x"])
    with pytest.raises(ValueError, match="outside the spool"):
        journal.write(Path("../escape.dcm"), [b"y"])
    [segment] = segments(tmp_path / "spool")
    data = segment.read_bytes()
    forged = record_chunks(segment_generation(data) or 0, b"../escape.dcm", [b"y"])
    data += b"".join(forged)
    assert [str(path) for path, _, _ in records(data)] == ["a/ok.dcm"]
    journal.close()


def test_appends_from_many_threads_are_each_whole(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "spool", idle_s=3600)

    def append(thread: int) -> None:
        for n in range(10):
            journal.write(Path(f"{thread}/{n}.dcm"), [os.urandom(1000 + thread)])

    threads = [threading.Thread(target=append, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [segment] = segments(tmp_path / "spool")
    found = {str(path): len(body) for path, body, _ in records(segment.read_bytes())}
    assert found == {f"{t}/{n}.dcm": 1000 + t for t in range(6) for n in range(10)}
    assert journal.checkpoint() == 1 and not segments(tmp_path / "spool")
    assert all((tmp_path / "spool" / name).stat().st_size == size for name, size in found.items())
    journal.close()


def test_recovery_leaves_the_segment_of_a_live_writer_alone(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    journal = Journal(spool, idle_s=3600)  # another node on a shared spool, say
    journal.write(Path("a/1.dcm"), [b"live"])
    (spool / "a" / "1.dcm").unlink()

    assert recover(spool)["in_use"] == 1
    assert segments(spool) and not (spool / "a" / "1.dcm").exists()
    journal.close()


def stored_instances(tmp_path: Path, count: int) -> list[tuple[Arrival, bytes]]:
    stored = []
    for n in range(count):
        file = tmp_path / "sent" / f"{n}.dcm"
        file.parent.mkdir(parents=True, exist_ok=True)
        write_image(file, CTImageStorage, "CT")
        arrival, problem = examine(file)
        assert arrival is not None, problem
        stored.append((arrival, file.read_bytes()))
    return stored


# Where the segment ends after the power cut, from the start of the last record.
CUTS = {"inside its header": HEADER.size // 2, "one byte short": -1, "whole": None}


@pytest.mark.parametrize("cut", CUTS.values(), ids=CUTS.keys())
def test_reconcile_after_a_power_cut_indexes_every_acknowledged_instance_and_no_cut_one(
    tmp_path: Path, cut: int | None
) -> None:
    folder = tmp_path / "spool"
    spool = Spool(folder, Database(tmp_path / "before.db"), min_free_bytes=0)
    spool.journal = Journal(folder, idle_s=3600)
    instances = stored_instances(tmp_path, 2)
    for arrival, data in instances:
        assert spool.store(arrival, [data]) is not None  # each acknowledged
    [segment] = segments(folder)
    journaled = segment.read_bytes()
    spool.close()

    # The power cut: nothing flushed after the journal's fdatasync survives (the spool
    # files, the index's commits), and the last append was cut short wherever `cut` says.
    for file in folder.rglob("*.dcm"):
        file.unlink()
    last = instances[-1][0]
    last_start = len(journaled) - (
        HEADER.size + len(str(last.relative_path)) + len(instances[-1][1])
    )
    end = (
        len(journaled) if cut is None else (last_start + cut if cut >= 0 else len(journaled) + cut)
    )
    segment.write_bytes(journaled[:end])

    database = Database(tmp_path / "after.db")
    after = Spool(folder, database, min_free_bytes=0)
    counts = after.reconcile(tmp_path / "quarantine")
    after.close()

    whole = instances if cut is None else instances[:-1]
    assert counts["indexed"] == len(whole) and counts["quarantined"] == 0
    for arrival, data in whole:
        assert (folder / arrival.relative_path).read_bytes() == data
    assert (folder / last.relative_path).exists() == (cut is None)
    assert not segments(folder)


def spares(spool: Path) -> list[Path]:
    return sorted(journal_folder(spool).glob(f"*{SPARE_SUFFIX}"))


def test_a_checkpointed_segment_is_reused_and_its_old_records_are_never_replayed(
    tmp_path: Path,
) -> None:
    """A spare is written over in place (its size stays: the flush is of data alone), and a
    power cut after its reuse replays its new records only: a file deleted since its old
    record was checkpointed (retention, say) does not come back."""
    spool = tmp_path / "spool"
    journal = Journal(spool, idle_s=3600)
    for n in range(3):
        journal.write(Path(f"old/{n}.dcm"), [bytes([n]) * 5000])
    [used] = segments(spool)
    size = used.stat().st_size
    assert journal.checkpoint() == 1 and spares(spool) == [used.with_suffix(SPARE_SUFFIX)]
    for n in range(3):
        (spool / "old" / f"{n}.dcm").unlink()

    journal.write(Path("new/0.dcm"), [b"n" * 100])
    [reused] = segments(spool)
    assert not spares(spool) and reused.stat().st_size == size  # written over, not grown
    data = reused.read_bytes()
    assert [str(path) for path, _, _ in records(data)] == ["new/0.dcm"]
    (spool / "new" / "0.dcm").unlink()  # the power cut took the unflushed spool file

    with _killed(journal):
        counts = recover(spool)
    assert counts["replayed"] == 1 and counts["in_place"] == 0
    assert (spool / "new" / "0.dcm").read_bytes() == b"n" * 100
    assert not (spool / "old").exists() or not any((spool / "old").iterdir())
    assert not segments(spool) and len(spares(spool)) == 1


def test_segments_made_ready_but_never_named_in_use_are_not_replayed(tmp_path: Path) -> None:
    """A kill between claiming a spare and flushing its new first block leaves a `.claim`:
    whatever records it holds are an earlier use's, already in the spool."""
    spool = tmp_path / "spool"
    journal = Journal(spool, idle_s=3600)
    journal.write(Path("a/1.dcm"), [b"old"])
    assert journal.checkpoint() == 1
    journal.close()
    [spare] = spares(spool)
    claim = spare.with_suffix(".claim")
    spare.rename(claim)
    (spool / "a" / "1.dcm").unlink()
    counts = recover(spool)
    assert counts["replayed"] == 0 and not (spool / "a" / "1.dcm").exists()
    assert not claim.exists() and spares(spool)


def test_a_segment_whose_first_block_does_not_check_is_kept_and_reported(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    journal = Journal(spool, idle_s=3600)
    journal.write(Path("a/1.dcm"), [b"x"])
    [segment] = segments(spool)
    with _killed(journal):
        data = bytearray(segment.read_bytes())
        data[8] ^= 0xFF
        segment.write_bytes(bytes(data))
        assert recover(spool)["unreadable"] == 1
    assert segment.exists()


@contextmanager
def _killed(journal: Journal) -> Iterator[None]:
    """As if the journal's process had died: its segments unlocked, nothing checkpointed."""
    active = journal._active
    assert active is not None
    os.close(active.descriptor)  # releases its lock, as the process's death would
    journal._active = None
    try:
        yield
    finally:
        journal._stopping = True
        journal.close()


def test_the_spool_file_is_in_place_only_once_its_record_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written under a temporary name while the segment is flushed; renamed after the flush
    returns; a flush that fails leaves no spool file and raises (the sender is told)."""
    spool = tmp_path / "spool"
    journal = Journal(spool, idle_s=3600)
    journal.write(Path("a/0.dcm"), [b"first"])  # the segment made ready (its own flush)
    target = spool / "a" / "1.dcm"
    seen: list[bool] = []
    flush = os.fdatasync

    def watched(descriptor: int) -> None:
        seen.append(target.exists())
        flush(descriptor)

    monkeypatch.setattr(os, "fdatasync", watched)
    journal.write(Path("a/1.dcm"), [b"second"])
    assert seen == [False] and target.read_bytes() == b"second"

    def failing(descriptor: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError, match="Input/output"):
        journal.write(Path("a/2.dcm"), [b"third"])
    assert sorted(p.name for p in (spool / "a").iterdir()) == ["0.dcm", "1.dcm"]
    monkeypatch.setattr(os, "fdatasync", flush)
    journal.close()


def test_a_segment_of_round_2s_format_is_replayed_after_an_upgrade(tmp_path: Path) -> None:
    """A node that stopped with a journal of the earlier format (no first block, CRC-32)
    loses none of its acknowledged instances to the upgrade; a cut last record is dropped."""
    spool = tmp_path / "spool"
    folder = journal_folder(spool)
    folder.mkdir(parents=True)
    written = [(b"1.2/3.4/5.dcm", b"first"), (b"1.2/3.4/6.dcm", b"second")]
    data = b"".join(
        LEGACY_HEADER.pack(LEGACY_MAGIC, len(name), len(body), zlib.crc32(body, zlib.crc32(name)))
        + name
        + body
        for name, body in written
    )
    (folder / f"123-old{SUFFIX}").write_bytes(data[:-1])  # the last one cut short

    counts = recover(spool)
    assert counts["replayed"] == 1 and counts["unreadable"] == 0
    assert (spool / "1.2/3.4/5.dcm").read_bytes() == b"first"
    assert not (spool / "1.2/3.4/6.dcm").exists() and not segments(spool)
