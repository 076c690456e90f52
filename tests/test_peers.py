"""The tests' own harness: what keeps parallel workers apart."""

from __future__ import annotations

import pytest

from tests import peers


def test_xdist_workers_draw_ports_from_disjoint_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    slices = []
    for worker in ("gw0", "gw1", "gw2"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        slices.append(set(peers._listen_ports()))
    assert all(len(ports) > 4000 for ports in slices)
    assert not slices[0] & slices[1] and not slices[1] & slices[2] and not slices[0] & slices[2]
    assert set().union(*slices) == set(range(20000, 32768))


def test_one_process_draws_from_the_whole_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert peers._listen_ports() == range(20000, 32768)
