"""Shared fixtures, and the `integration` marker, given here to every test that needs a real
peer or process, or runs long; `pytest -m "not integration"` (`make test-unit`) runs the rest.

The rule, per test: it is integration when
- it lies in tests/hostile/ (attacks on a running node), or
- its code, its fixtures' code, or any helper of the tests package they call (followed through
  tests/*.py: functions, context managers, classes' methods, closures) reaches a real peer:
  `require_tool` (DCMTK, Orthanc, dciodvfy, systemd-analyze: every external tool goes through
  it), `run_cadnode` (`cadnode serve` as a subprocess), or the modules `subprocess`,
  `multiprocessing` or `selenium` (any other process: the CLI, a fresh interpreter, chromium), or
- it, or a fixture it uses, is in SLOW: in-process, but seconds long (training a model).

A test left unit that still starts a known peer tool (PEER_TOOLS) fails with the reason (the
guard at the end), so the rule cannot silently go stale.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cadnode.core import logs
from cadnode.core.db import Database
from tests import dicom_validation, peers, postgres

# Loggers not cached, so every test's structlog.testing.capture_logs sees every event.
logs.CACHE_LOGGERS = False
logs.configure()

TESTS = Path(__file__).resolve().parent

# What makes a test integration when its code reaches it.
PEER_HELPERS = (dicom_validation.require_tool, peers.run_cadnode)
PEER_MODULES = ("subprocess", "multiprocessing", "selenium", "psycopg", "psycopg2")

# In-process, but seconds long (measured on the 2-core CI box): "file::name", where the name is
# a test's (without its parameters) or a fixture's (every test using it, e.g. a model trained
# once per module).
SLOW = {
    "test_training.py::tiny",  # trains the tiny rule-out model
    "test_training.py::test_checkpoint_of_another_config_is_refused",
    "test_training.py::test_batch_control_experiment_thresholds_by_the_data_prior",
    "test_training_engines.py::tiny_segmenter",
    "test_training_engines.py::tiny_detector",
    "test_training_engines.py::test_segmenter_build_chooses_through_the_built_ruleout_bundle",
    "test_training_engines.py::test_shipped_detector_holds_its_card",
    "test_training_folders.py::chest_folder",  # writes a phantom folder, builds per layout
    "test_training_folders.py::test_memory_stays_flat_when_the_dataset_doubles",
    "test_findings.py::tiny_findings",  # trains the tiny cxr-findings model
    "test_findings.py::test_findings_train_from_a_cxrlt_folder_with_vindr_boxes",
}

# Executables a unit test must never start (each is a real peer): the guard's list.
PEER_TOOLS = {
    "storescu", "storescp", "echoscu", "findscu", "movescu", "getscu", "dcmdump", "dcmodify",
    "Orthanc", "dciodvfy", "chromium", "chromedriver", "systemd-analyze", "psql", "postgres",
    "cadnode serve",
}


# The database-level tests run on both databases; PostgreSQL's variant is integration (a
# server process), so the unit subset stays on SQLite.
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    where = tmp_path / "cadnode.db" if request.param == "sqlite" else None
    made = Database(where or request.getfixturevalue("postgres_url"))
    yield made
    made.engine.dispose()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    """One PostgreSQL server for the whole run (tests/postgres.py)."""
    with postgres.run_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: postgres.PostgresServer) -> Iterator[str]:
    """A fresh, empty database on that server, for one test: its URL."""
    with postgres.fresh_database(postgres_server) as url:
        yield url


# --- the integration marker -------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)  # before -m deselects on it
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reach = _Reach()
    for item in items:
        if _is_integration(item, reach):
            item.add_marker(pytest.mark.integration)
    _check_slow_names(items)


def _is_integration(item: pytest.Item, reach: _Reach) -> bool:
    path = Path(str(item.path))
    if TESTS / "hostile" in path.parents or item.get_closest_marker("hostile"):
        return True
    if item.get_closest_marker("integration"):
        return True
    roots: list[Any] = [getattr(item, "function", None)]
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    for definitions in (fixtureinfo.name2fixturedefs.values() if fixtureinfo else ()):
        roots.extend(getattr(d, "func", None) for d in definitions)
    roots = [_unwrap(root) for root in roots if root is not None]
    if any(_slow_name(root) in SLOW for root in roots):
        return True
    return any(reach.peer(root) for root in roots)


def _slow_name(function: Any) -> str:
    """"file::name" of a test or fixture function, as SLOW names it."""
    code = getattr(function, "__code__", None)
    return f"{Path(code.co_filename).name}::{function.__name__}" if code else ""


class _Reach:
    """Whether code reaches a peer, following what it names through the tests package."""

    def __init__(self) -> None:
        self._peers = {id(_unwrap(h)) for h in PEER_HELPERS}
        self._answers: dict[int, bool] = {}
        self._keep: list[Any] = []  # the ids above stay those of live objects

    def peer(self, root: Any) -> bool:
        root = _unwrap(root)
        if id(root) not in self._answers:
            self._keep.append(root)
            self._answers[id(root)] = self._search(root)
        return self._answers[id(root)]

    def _search(self, root: Any) -> bool:
        seen, todo = {id(root)}, [root]
        while todo:
            obj = todo.pop()
            if id(obj) in self._peers:
                return True
            for found in map(_unwrap, self._named_by(obj)):
                if id(found) not in seen:
                    seen.add(id(found))
                    todo.append(found)
        return False

    def _named_by(self, obj: Any) -> Iterator[Any]:
        if isinstance(obj, type):
            if _ours(obj):
                for value in vars(obj).values():
                    if isinstance(value, property):
                        yield from (f for f in (value.fget, value.fset) if f is not None)
                    elif isinstance(value, staticmethod | classmethod):
                        yield value.__func__
                    elif inspect.isfunction(value):
                        yield value
            return
        if not inspect.isfunction(obj) or not _ours(obj):
            return
        names = set(_names(obj.__code__))
        for cell in obj.__closure__ or ():
            with contextlib.suppress(ValueError):  # an empty cell
                yield cell.cell_contents
        yield from (v for v in obj.__defaults__ or () if callable(v))
        for name in names:
            value = obj.__globals__.get(name)
            if isinstance(value, types.ModuleType):
                if value.__name__.split(".")[0] in PEER_MODULES:
                    yield from PEER_HELPERS  # reaching a process module counts as a peer
                elif value.__name__.startswith("tests"):
                    yield from (getattr(value, n) for n in names if hasattr(value, n))
            elif value is not None:
                if str(getattr(value, "__module__", "")).split(".")[0] in PEER_MODULES:
                    yield from PEER_HELPERS  # e.g. `from selenium import webdriver`'s classes
                else:
                    yield value


def _names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    yield from code.co_freevars
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, staticmethod | classmethod):
        obj = obj.__func__
    try:
        return inspect.unwrap(obj) if callable(obj) else obj
    except ValueError:
        return obj


def _ours(obj: Any) -> bool:
    return str(getattr(obj, "__module__", "")).startswith("tests")


def _check_slow_names(items: list[pytest.Item]) -> None:
    """A SLOW entry whose test or fixture is gone (renamed, moved) is an error, not a no-op."""
    modules = {Path(str(i.path)).name: getattr(i, "module", None) for i in items}
    for entry in SLOW:
        file, name = entry.split("::")
        module = modules.get(file)
        if module is not None and not hasattr(module, name):
            raise pytest.UsageError(f"tests/conftest.py SLOW names {entry}, which does not exist")


# --- the guard: a unit test that starts a peer tool fails ------------------------------

_started: list[str] = []
_guarding = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _guarding and event in ("subprocess.Popen", "os.posix_spawn", "os.exec"):
        with contextlib.suppress(TypeError, ValueError, IndexError):  # no path given
            argv = [os.fsdecode(a) for a in args[1]] if args[1] else []
            serve = "cadnode.cli" in argv and "serve" in argv
            _started.append("cadnode serve" if serve else os.path.basename(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from _guarded(item))


def _guarded(item: pytest.Item) -> Iterator[None]:
    global _guarding
    unit = item.get_closest_marker("integration") is None
    _started.clear()
    _guarding = unit
    try:
        result = yield
    finally:
        _guarding = False
    started = sorted({name for name in _started if name in PEER_TOOLS})
    if unit and started:
        pytest.fail(
            f"this unit test started {', '.join(started)}: tests/conftest.py's rule should "
            "have marked it integration (reach the tool through require_tool or run_cadnode, "
            "or name the test in SLOW)",
            pytrace=False,
        )
    return result
