from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cadnode.core.config import (
    EMBEDDED_CONFIG,
    Destination,
    Settings,
    automatic_receivers,
    load_settings,
)
from cadnode.core.yamlfile import ConfigError


def write(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "cadnode.yaml"
    path.write_text(text)
    return {"CADNODE_CONFIG": str(path)}


def problems(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return caught.value.problems


def test_embedded_default_loads_with_its_documented_values() -> None:
    settings = load_settings({})
    assert settings.dicom.ae_title == "CADNODE"
    assert settings.dicom.port == 11112
    assert settings.dicom.bind == "127.0.0.1"
    assert settings.storage.data_dir == (EMBEDDED_CONFIG.parent.parent / "var").resolve()
    assert settings.engines.backend == "auto"
    assert [str(d) for d in settings.result_destinations()] == ["ORTHANC@127.0.0.1:4242"]


def test_receivers_default_to_auto_decided_by_the_cpus_at_load(tmp_path: Path) -> None:
    assert load_settings({}).dicom.receivers == automatic_receivers()
    in_file = write(tmp_path, "dicom:\n  receivers: auto\n")
    assert load_settings(in_file).dicom.receivers == automatic_receivers()
    variable = {**write(tmp_path, "dicom:\n  receivers: 2\n"), "CADNODE_DICOM_RECEIVERS": "auto"}
    assert load_settings(variable).dicom.receivers == automatic_receivers() != 2
    [problem] = problems(write(tmp_path, "dicom:\n  receivers: many\n"))
    assert problem.startswith(f"{in_file['CADNODE_CONFIG']}:2:") and "or auto" in problem


@pytest.mark.parametrize(("cpus", "receivers"), [(1, 1), (2, 4), (4, 4), (6, 6), (64, 8)])
def test_auto_receivers_are_one_per_cpu_within_bounds(
    monkeypatch: pytest.MonkeyPatch, cpus: int, receivers: int
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(cpus)))
    assert automatic_receivers() == receivers


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "CADNODE_DATA_DIR": str(tmp_path / "data"),
            "CADNODE_DICOM_PORT": "11999",
            "CADNODE_AE_TITLE": "NODE2",
            "CADNODE_HTTP_PORT": "8999",
            "CADNODE_DESTINATION": "PACS@10.1.2.3:104",
        }
    )
    assert settings.storage.data_dir == tmp_path / "data"
    assert (settings.dicom.port, settings.dicom.ae_title, settings.http.port) == (
        11999,
        "NODE2",
        8999,
    )
    assert settings.result_destinations() == [
        Destination(ae_title="PACS", host="10.1.2.3", port=104)
    ]


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "storage:\n  data_dir: here\n"))
    assert settings.storage.data_dir == tmp_path / "here"
    assert settings.rules == tmp_path / "rules.yaml"


def test_a_relative_sqlite_file_in_the_database_url_is_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    settings = load_settings(write(tmp_path, "database:\n  url: sqlite:///var/state.db\n"))
    assert settings.database_url.database == str(tmp_path / "var" / "state.db")
    absolute = load_settings(write(tmp_path, "database:\n  url: sqlite:////srv/state.db\n"))
    assert absolute.database_url.database == "/srv/state.db"
    assert problems(write(tmp_path, "database:\n  url: mysql://x/y\n"))  # still refused


def test_a_wrong_type_names_file_line_column_and_key(tmp_path: Path) -> None:
    environ = write(tmp_path, "dicom:\n  ae_title: CADNODE\n  port: eleven\n")
    [problem] = problems(environ)
    assert problem.startswith(f"{tmp_path / 'cadnode.yaml'}:3:3: dicom.port:")
    assert "'eleven'" in problem


def test_an_unknown_key_is_an_error_not_ignored(tmp_path: Path) -> None:
    [problem] = problems(write(tmp_path, "dicom:\n  aetitle: CADNODE\n"))
    assert ":2:3: dicom.aetitle: Extra inputs are not permitted" in problem


def test_an_ae_title_longer_than_16_characters_is_refused(tmp_path: Path) -> None:
    [problem] = problems(write(tmp_path, "dicom:\n  ae_title: A_VERY_LONG_AE_TITLE\n"))
    assert "dicom.ae_title" in problem and "16" in problem


def test_results_must_name_configured_destinations(tmp_path: Path) -> None:
    [problem] = problems(write(tmp_path, "results:\n  destinations: [nowhere]\n"))
    assert "nowhere" in problem


def test_broken_yaml_names_its_line(tmp_path: Path) -> None:
    [problem] = problems(write(tmp_path, "dicom:\n  port: [1\n"))
    assert "not valid YAML" in problem and "cadnode.yaml:" in problem


@pytest.mark.parametrize("text", ["PACS@host", "PACS:104", "@host:104", "PACS@host:port", ""])
def test_destination_variable_must_be_ae_at_host_colon_port(text: str) -> None:
    [problem] = problems({"CADNODE_DESTINATION": text})
    assert problem.startswith("CADNODE_DESTINATION: ") and "AE@host:port" in problem


def test_a_destination_variable_with_a_bad_ae_title_names_the_variable() -> None:
    [problem] = problems({"CADNODE_DESTINATION": "A_VERY_LONG_AE_TITLE@host:104"})
    assert problem.startswith("CADNODE_DESTINATION.ae_title: ") and "16" in problem


def test_a_non_numeric_port_variable_is_refused() -> None:
    [problem] = problems({"CADNODE_DICOM_PORT": "x"})
    assert problem.startswith("CADNODE_DICOM_PORT: ") and "'x'" in problem


@pytest.mark.parametrize(
    ("variable", "value", "read"),
    [
        ("CADNODE_DATA_DIR", "/srv/cadnode", lambda s: s.storage.data_dir),
        ("CADNODE_DICOM_PORT", "11999", lambda s: s.dicom.port),
        ("CADNODE_AE_TITLE", "NODE2", lambda s: s.dicom.ae_title),
        ("CADNODE_DICOM_RECEIVERS", "4", lambda s: s.dicom.receivers),
        ("CADNODE_HTTP_PORT", "8999", lambda s: s.http.port),
        ("CADNODE_ENGINES_DIR", "/srv/engines", lambda s: s.engines.dir),
        ("CADNODE_ADMIN_PASSWORD_HASH", "$argon2id$v=19$x", lambda s: s.http.admin_password_hash),
        ("CADNODE_DESTINATION", "PACS@10.1.2.3:104", lambda s: str(s.result_destinations()[0])),
    ],
)
def test_each_variable_overrides_its_key_of_the_file(
    tmp_path: Path, variable: str, value: str, read: Callable[[Settings], Any]
) -> None:
    environ = write(
        tmp_path,
        "dicom:\n  port: 11000\n  ae_title: FILE\n  receivers: 2\n"
        "http:\n  port: 8000\n  admin_password_hash: $argon2id$v=19$file\n"
        "storage:\n  data_dir: data\nengines:\n  dir: engines\n"
        "destinations:\n  pacs: {ae_title: PACS, host: pacs, port: 11112}\n"
        "results:\n  destinations: [pacs]\n",
    )
    from_file = read(load_settings(environ))
    overridden = read(load_settings({**environ, variable: value}))
    assert overridden != from_file
    assert str(overridden) == value


def test_relative_path_variables_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings({"CADNODE_DATA_DIR": "data", "CADNODE_ENGINES_DIR": "engines"})
    assert (settings.storage.data_dir, settings.engines.dir) == (
        tmp_path / "data",
        tmp_path / "engines",
    )


def test_the_config_variable_names_the_file(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "dicom:\n  port: 11000\n")).dicom.port == 11000


def test_only_the_given_mapping_is_read_and_the_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CADNODE_DICOM_PORT", "11999")
    assert load_settings({}).dicom.port == 11112
    assert load_settings().dicom.port == 11999


@pytest.mark.parametrize(
    "variable",
    [
        "CADNODE_CONFIG",
        "CADNODE_DATA_DIR",
        "CADNODE_DICOM_PORT",
        "CADNODE_AE_TITLE",
        "CADNODE_DICOM_RECEIVERS",
        "CADNODE_HTTP_PORT",
        "CADNODE_ENGINES_DIR",
        "CADNODE_ADMIN_PASSWORD_HASH",
        "CADNODE_DESTINATION",
    ],
)
def test_an_empty_variable_is_an_error_naming_it(variable: str) -> None:
    [problem] = problems({variable: ""})  # the embedded file has no admin_password_hash
    assert problem.startswith(f"{variable}: ")


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("CADNODE_DICOM_PORT", "70000", "dicom.port"),
        ("CADNODE_ADMIN_PASSWORD_HASH", "plain-text", "http.admin_password_hash"),
        ("CADNODE_AE_TITLE", "A_VERY_LONG_AE_TITLE", "dicom.ae_title"),
        ("CADNODE_DICOM_RECEIVERS", "0", "dicom.receivers"),
    ],
)
def test_a_bad_variable_is_named_not_the_line_it_overrides(
    tmp_path: Path, variable: str, value: str, key: str
) -> None:
    environ = write(
        tmp_path,
        "dicom:\n  port: 11000\n  ae_title: FILE\n  receivers: 2\n"
        "http:\n  admin_password_hash: $argon2id$v=19$file\n",
    )
    [problem] = problems({**environ, variable: value})
    assert problem.startswith(f"{variable}: {key}: ") and repr(value)[1:-1] in problem


def test_a_bad_variable_and_a_bad_line_are_each_named(tmp_path: Path) -> None:
    environ = write(tmp_path, "dicom:\n  port: 11000\nhttp:\n  port: eighty\n")
    assert problems({**environ, "CADNODE_DICOM_PORT": "70000"}) == [
        "CADNODE_DICOM_PORT: dicom.port: Input should be less than or equal to 65535 (got 70000)",
        f"{tmp_path / 'cadnode.yaml'}:4:3: http.port: Input should be a valid integer, "
        "unable to parse string as an integer (got 'eighty')",
    ]


def test_a_variable_under_a_section_the_file_leaves_empty_reports_the_file(
    tmp_path: Path,
) -> None:
    [problem] = problems({**write(tmp_path, "http:\n"), "CADNODE_HTTP_PORT": "8999"})
    assert problem.startswith(f"{tmp_path / 'cadnode.yaml'}:1:1: http: ")
