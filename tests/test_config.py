from __future__ import annotations

from pathlib import Path

import pytest

from cadnode.core.config import EMBEDDED_CONFIG, Destination, load_settings
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


@pytest.mark.parametrize("text", ["PACS@host", "PACS:104", "@host:104", "PACS@host:port"])
def test_destination_variable_must_be_ae_at_host_colon_port(text: str) -> None:
    with pytest.raises(ConfigError, match="AE@host:port"):
        load_settings({"CADNODE_DESTINATION": text})


def test_a_non_numeric_port_variable_is_refused() -> None:
    with pytest.raises(ConfigError, match="CADNODE_DICOM_PORT"):
        load_settings({"CADNODE_DICOM_PORT": "x"})
