"""The daemon's configuration: typed, validated once at load, with file:line in errors.

Precedence: built-in defaults < the YAML file (`CADNODE_CONFIG`, else the embedded
`config/cadnode.yaml`) < environment variables (see `ENVIRONMENT`). Relative paths in the
file are relative to the file, so the daemon behaves the same from any working directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cadnode.yamlfile import ConfigError, load_model, read_yaml

EMBEDDED_CONFIG = Path(__file__).resolve().parent.parent / "config" / "cadnode.yaml"

AETitle = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*\S[\x20-\x5b\x5d-\x7e]*$"
    ),
]
Port = Annotated[int, Field(ge=1, le=65535)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Destination(Section):
    """A DICOM peer that results are C-STOREd to."""

    ae_title: AETitle
    host: str
    port: Port

    @classmethod
    def parse(cls, text: str) -> Destination:
        """`AE@host:port`, the form of `CADNODE_DESTINATION`."""
        match = re.fullmatch(r"(?P<ae>[^@]+)@(?P<host>[^:]+):(?P<port>\d+)", text.strip())
        if not match:
            raise ConfigError([f"CADNODE_DESTINATION: expected AE@host:port, got {text!r}"])
        return cls(ae_title=match["ae"], host=match["host"], port=int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class DicomSettings(Section):
    ae_title: AETitle = "CADNODE"
    # Loopback by default: the embedded node accepts any calling AE, so only local peers.
    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112
    max_associations: int = Field(default=16, ge=1)
    network_timeout_s: float = Field(default=60, gt=0)


class HttpSettings(Section):
    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080


class StorageSettings(Section):
    data_dir: Path = Path("var")

    @property
    def database(self) -> Path:
        return self.data_dir / "cadnode.db"

    @property
    def spool(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results(self) -> Path:
        return self.data_dir / "results"


class AssembleSettings(Section):
    quiet_period_s: float = Field(default=3.0, ge=0, le=3600)


class DispatchSettings(Section):
    max_attempts: int = Field(default=10, ge=1)
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)


class EngineSettings(Section):
    dir: Path = Path("engines")
    backend: str = Field(default="onnxruntime", pattern="^onnxruntime$")


class ResultsSettings(Section):
    destinations: list[str] = Field(default_factory=list)


class Settings(Section):
    dicom: DicomSettings = DicomSettings()
    http: HttpSettings = HttpSettings()
    storage: StorageSettings = StorageSettings()
    assemble: AssembleSettings = AssembleSettings()
    dispatch: DispatchSettings = DispatchSettings()
    engines: EngineSettings = EngineSettings()
    rules: Path = Path("rules.yaml")
    destinations: dict[str, Destination] = Field(default_factory=dict)
    results: ResultsSettings = ResultsSettings()

    @model_validator(mode="after")
    def _destinations_exist(self) -> Settings:
        unknown = [name for name in self.results.destinations if name not in self.destinations]
        if unknown:
            raise ValueError(f"results.destinations names unknown destinations: {unknown}")
        return self

    def result_destinations(self) -> list[Destination]:
        return [self.destinations[name] for name in self.results.destinations]


# Environment variable -> (path of keys in the document, how to read it).
ENVIRONMENT: Mapping[str, tuple[tuple[str, ...], type]] = {
    "CADNODE_DATA_DIR": (("storage", "data_dir"), str),
    "CADNODE_DICOM_PORT": (("dicom", "port"), int),
    "CADNODE_AE_TITLE": (("dicom", "ae_title"), str),
    "CADNODE_HTTP_PORT": (("http", "port"), int),
    "CADNODE_ENGINES_DIR": (("engines", "dir"), str),
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    path = Path(environ.get("CADNODE_CONFIG", EMBEDDED_CONFIG)).resolve()
    document = read_yaml(path)
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError([f"{path}:1:1: expected a mapping of sections at the top level"])
    _resolve_relative_paths(document, path.parent)
    _apply_environment(document, environ)
    return load_model(path, Settings, document)


def _resolve_relative_paths(document: dict[str, Any], base: Path) -> None:
    for keys in (("storage", "data_dir"), ("engines", "dir"), ("rules",)):
        parent = _parent(document, keys)
        value = parent.get(keys[-1]) if parent is not None else None
        if isinstance(value, str) and not Path(value).is_absolute():
            parent[keys[-1]] = str((base / value).resolve())  # type: ignore[index]
    if "rules" not in document:
        document["rules"] = str((base / "rules.yaml").resolve())


def _apply_environment(document: dict[str, Any], environ: Mapping[str, str]) -> None:
    for variable, (keys, kind) in ENVIRONMENT.items():
        if variable not in environ:
            continue
        try:
            value = kind(environ[variable])
        except ValueError as error:
            raise ConfigError(
                [f"{variable}: expected {kind.__name__}, got {environ[variable]!r}"]
            ) from error
        if kind is str and keys[-1] in ("data_dir", "dir"):
            value = str(Path(value).resolve())
        node = document
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    if "CADNODE_DESTINATION" in environ:
        destination = Destination.parse(environ["CADNODE_DESTINATION"])
        document.setdefault("destinations", {})["CADNODE_DESTINATION"] = destination.model_dump()
        document["results"] = {"destinations": ["CADNODE_DESTINATION"]}


def _parent(document: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = document
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None
