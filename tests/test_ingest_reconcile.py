"""Startup reconciliation: after a crash, spool and index are made to agree before anyone sends.

A file without an index row is indexed when it is a whole DICOM object, else quarantined;
an index row whose file is gone is marked; temporaries of interrupted writes are removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage
from sqlmodel import select

from cadnode.core.db import Database, Instance, Job, utcnow
from cadnode.ingest.spool import Spool, examine, instance_row
from tests.ingest import captured_events, named
from tests.synthetic import write_image


def place(spool: Path, file: Path) -> Path:
    """Put `file` where receive would have: study/series/instance.dcm under the spool."""
    ds = dcmread(file, stop_before_pixels=True)
    target = spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(file, target)
    return target


def instances(database: Database) -> dict[str, Instance]:
    with database.session() as session:
        return {i.sop_instance_uid: i for i in session.exec(select(Instance))}


def test_reconcile_indexes_quarantines_marks_and_cleans(tmp_path: Path, database: Database) -> None:
    spool = Spool(tmp_path / "spool", database, min_free_bytes=0)
    stored, orphan, truncated = (tmp_path / f"{n}.dcm" for n in ("stored", "orphan", "cut"))
    kept = write_image(stored, CTImageStorage, "CT")
    kept_arrival, _ = examine(stored)
    assert kept_arrival is not None
    spool.store(kept_arrival, [stored.read_bytes()])
    lost = write_image(orphan, CTImageStorage, "CT")  # written, then killed before its commit
    place(spool.folder, orphan)
    write_image(truncated, CTImageStorage, "CT")
    cut = place(spool.folder, truncated)
    cut.write_bytes(cut.read_bytes()[:-100])  # a file cut short (by a disk fault, a copy...)
    (spool.folder / "junk.dcm").write_bytes(b"not DICOM at all")
    (cut.parent / ".x.dcm.0123.part").write_bytes(b"half a write")
    assert spool.journal is not None
    spool.journal.checkpoint()  # all this long after the store: its journal is gone
    (spool.folder / kept_arrival.relative_path).unlink()  # someone deleted a stored file

    with captured_events() as events:
        counts = spool.reconcile(tmp_path / "quarantine")

    assert counts == {"temporaries_removed": 1, "indexed": 1, "quarantined": 2, "missing": 1}
    rows = instances(database)
    assert rows[lost.SOPInstanceUID].missing_since is None  # the orphan is indexed
    assert rows[kept.SOPInstanceUID].missing_since is not None  # the lost file is marked
    assert not list(spool.folder.rglob("*.part"))
    quarantined = sorted(p.name for p in (tmp_path / "quarantine").rglob("*.dcm"))
    assert quarantined == sorted(["junk.dcm", cut.name])
    reasons = {Path(e["path"]).name: e["reason"] for e in named(events, "spool.quarantined")}
    assert "truncated" in reasons[cut.name]
    [missing] = named(events, "spool.file_missing")
    assert missing["job"] == rows[kept.SOPInstanceUID].job_id and missing["instances"] == 1
    with database.session() as session:  # the orphan counts in its study's job
        job = session.get(Job, rows[lost.SOPInstanceUID].job_id)
        assert job is not None and job.instance_count == 1

    # The sender resends the instance whose file was lost: it is whole again, not a duplicate.
    assert spool.store(kept_arrival, [stored.read_bytes()]) is None
    assert instances(database)[kept.SOPInstanceUID].missing_since is None
    assert (spool.folder / kept_arrival.relative_path).read_bytes() == stored.read_bytes()
    spool.close()


CUTS = [
    ("CT, inside the pixel data", "ct", -5000),
    ("CT, before the pixel data element", "ct", "before-pixels"),
    ("JPEG 2000, inside the last fragment", "JPEG2000.dcm", -40),
    ("JPEG 2000, after the last fragment", "JPEG2000.dcm", -8),
]


@pytest.mark.parametrize(("where", "kind", "cut"), CUTS, ids=[c[0] for c in CUTS])
def test_a_file_cut_short_anywhere_is_not_taken_for_whole(
    where: str, kind: str, cut: int | str, tmp_path: Path
) -> None:
    source = tmp_path / "whole.dcm"
    if kind == "ct":
        write_image(source, CTImageStorage, "CT")
    else:
        shutil.copyfile(pydicom.data.get_testdata_file(kind), source)  # type: ignore[arg-type]
    assert examine(source)[1] is None, "the whole file must pass"
    data = source.read_bytes()
    end = data.rindex(b"\xe0\x7f\x10\x00") if cut == "before-pixels" else int(cut)
    (tmp_path / "cut.dcm").write_bytes(data[:end])
    arrival, problem = examine(tmp_path / "cut.dcm")
    assert arrival is None and problem is not None and "truncated" in problem, where


def test_the_index_row_receive_writes_names_every_column_of_the_model(
    tmp_path: Path, database: Database
) -> None:
    """The hot path inserts an instance's row without the model filling in defaults, so a
    column added to the model must be added there too."""
    file = tmp_path / "ct.dcm"
    write_image(file, CTImageStorage, "CT")
    arrival, _ = examine(file)
    assert arrival is not None
    assert set(instance_row(arrival, "a/b/c.dcm", 1, 1, utcnow())) == set(Instance.model_fields)
    spool = Spool(tmp_path / "spool", database, min_free_bytes=0)
    indexed = spool.store(arrival, [file.read_bytes()])
    spool.close()
    assert indexed is not None
    row = instances(database)[arrival.sop_instance_uid]
    assert (row.sop_class_uid, row.transfer_syntax, row.size, row.job_id) == (
        CTImageStorage,
        arrival.transfer_syntax,
        file.stat().st_size,
        indexed.job_id,
    )
    assert row.received_at is not None and row.missing_since is None
