"""The daemon's configuration: typed, validated once at load, with file:line in errors.

Precedence: built-in defaults < the YAML file (`CADNODE_CONFIG`, else the embedded
`config/cadnode.yaml`) < environment variables (see `Environment`). Relative paths in the
file are relative to the file, so the daemon behaves the same from any working directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    FilePath,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy import URL

from cadnode.core import connection
from cadnode.core.backoff import Backoff
from cadnode.core.yamlfile import ConfigError, load_model, problem, read_yaml

EMBEDDED_CONFIG = Path(__file__).resolve().parents[2] / "config" / "cadnode.yaml"

AETitle = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*\S[\x20-\x5b\x5d-\x7e]*$"
    ),
]
Port = Annotated[int, Field(ge=1, le=65535)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResultOptions(Section):
    """What a destination gets besides the SEG and SR every destination gets (about what
    encode makes, so the same for a DICOM peer and a DICOMweb service)."""

    # Also send a Secondary Capture with the findings drawn over the image (for a PACS that
    # cannot show SEG or SR); only destinations that ask get one (cadnode.encode.sc).
    secondary_capture: bool = False
    # Also send a Grayscale Softcopy Presentation State drawing the findings over the source
    # images (outlines, boxes, a label): shown by PACS that show neither SEG nor SR.
    presentation_state: bool = False
    # Also send each segmentation as a LABELMAP SEG (Supplement 243) for viewers that want
    # one; the binary SEG, which the SR references, is sent to every destination.
    labelmap_segmentation: bool = False


class Destination(ResultOptions):
    """A DICOM peer that results are C-STOREd to."""

    ae_title: AETitle
    # An IPv4 or IPv6 address (written bare, `::1`, or in brackets, `[::1]`) or a host name.
    host: str
    port: Port
    # Ask the peer to confirm it keeps each object (Storage Commitment, push model); its
    # answer comes to the node's DICOM port, so the peer must know the node's AE and address.
    storage_commitment: bool = False

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _destination_host(value)

    @classmethod
    def parse(cls, text: str) -> Destination:
        """`AE@host:port` (`AE@[::1]:port` for IPv6), the form of `CADNODE_DESTINATION`;
        ValueError if it is not."""
        return cls.model_validate(_address(text))

    def __str__(self) -> str:
        """`AE@host:port`, an IPv6 address in brackets (`AE@[::1]:104`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


class StowAuth(Section):
    """How the node proves who it is to a DICOMweb destination: a bearer token, or a user and
    password (HTTP Basic). Secrets are read from files (systemd credentials, a secrets mount),
    never written in the configuration nor passed in the environment, where child processes
    and /proc would see them; each request reads them again, so a rotated token needs no
    restart. Nothing set: no authentication."""

    bearer_token_file: FilePath | None = None
    username: str | None = Field(default=None, min_length=1, pattern=r"^[^:]+$")
    password_file: FilePath | None = None

    @model_validator(mode="after")
    def _one_scheme(self) -> StowAuth:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("basic authentication needs both username and password_file")
        if self.bearer_token_file is not None and self.username is not None:
            raise ValueError("bearer_token_file or username/password_file: one scheme, not both")
        return self


DIMSE_KEYS = ("ae_title", "host", "port", "storage_commitment")


class StowDestination(ResultOptions):
    """A DICOMweb service that results are sent to by STOW-RS (cadnode/deliver/stow.py)."""

    # The service root (Orthanc's `http://host:8042/dicom-web`); objects go to `{url}/studies`.
    url: str = Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    auth: StowAuth = StowAuth()
    # A request's deadline: `timeout_s`, plus `timeout_s_per_mb` for each MB of the objects in
    # it, from the connection to the last byte of the answer, however slowly they trickle.
    timeout_s: float = Field(default=30, gt=0)
    timeout_s_per_mb: float = Field(default=2, ge=0)
    # Send the body with chunked transfer encoding (no Content-Length), for proxies that want it.
    chunked: bool = False
    # Requests to this destination at the same time, each carrying up to
    # `instances_per_request` objects in one multipart body.
    max_in_flight: int = Field(default=2, ge=1, le=16)
    instances_per_request: int = Field(default=16, ge=1, le=1000)
    # https: the PEM bundle of the CAs that sign the server's certificate; unset: the system's.
    ca_file: FilePath | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_dimse(cls, values: Any) -> Any:
        given = [key for key in DIMSE_KEYS if isinstance(values, dict) and key in values]
        if given:
            raise ValueError(
                f"a destination with url is sent to by DICOMweb (STOW-RS): {', '.join(given)} "
                "belong to a DICOM (DIMSE) destination; give url or ae_title/host/port, not both"
            )
        return values

    @model_validator(mode="after")
    def _ca_for_https(self) -> StowDestination:
        if self.ca_file is not None and not self.url.startswith("https://"):
            raise ValueError("ca_file is for an https url")
        return self

    def __str__(self) -> str:
        return self.url


def _destination_kind(value: Any) -> str:
    return "dicomweb" if isinstance(value, dict) and "url" in value else "dicom"


# A destination in the configuration: a DICOM peer (AE title, host, port) or a DICOMweb
# service (url). The tags name neither key of a destination, so an error's position is found
# past them (cadnode/core/yamlfile.py).
AnyDestination = Annotated[
    Annotated[Destination, Tag("dicom")] | Annotated[StowDestination, Tag("dicomweb")],
    Discriminator(_destination_kind),
]


# The name the destination given by `CADNODE_DESTINATION` is configured (and queued) under.
ENVIRONMENT_DESTINATION = "CADNODE_DESTINATION"


def _address(text: str) -> dict[str, str]:
    match = re.fullmatch(
        r"(?P<ae_title>[^@]+)@(\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)",
        text.strip(),
    )
    if not match:
        raise ValueError("expected AE@host:port (AE@[IPv6]:port for an IPv6 address)")
    parts = match.groupdict()
    host = f"[{parts['ipv6']}]" if parts["ipv6"] else parts["host"]  # brackets: an IP only
    return {"ae_title": parts["ae_title"], "host": host, "port": parts["port"]}


# Host names as resolvers take them: letters, digits, hyphens and (container names) underscores.
_DESTINATION_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
_DESTINATION_HOST = re.compile(
    rf"^(?=.{{1,253}}$){_DESTINATION_LABEL}(\.{_DESTINATION_LABEL})*\.?$"
)


def _destination_host(value: str) -> str:
    """An IP address (IPv6 kept without brackets) or a host name; ValueError otherwise."""
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if bare is value and _DESTINATION_HOST.match(value):
        return value
    raise ValueError(f"{value!r} is not an IPv4 or IPv6 address or a host name")


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
LOOPBACK_NETWORKS = ["127.0.0.0/8", "::1/128"]


def _network_or_host(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as error:
        if not _HOST_NAME.match(value):
            raise ValueError(f"{value!r} is not an address, a network or a host name") from error
    return value


class Peer(Section):
    """A sender allowed to associate: its calling AE title and, optionally, where from."""

    ae_title: AETitle
    # An address, a network (10.1.2.0/24) or a host name; unset: from any address.
    host: str | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else _network_or_host(value)


class TlsSettings(Section):
    """DICOM TLS (PS3.15 annex B) on the DICOM port."""

    certificate: Path  # PEM: the node's certificate, then any intermediates
    private_key: Path  # PEM, not encrypted
    # PEM bundle of the CAs that sign peers' certificates. Set: every peer must present a
    # certificate one of them signed (mutual TLS). Unset: only the node proves who it is.
    client_ca: Path | None = None


# `dicom.receivers: auto`: a receiver process per association for the one to four modalities
# that usually send at once, more on a machine with more CPUs, within a bound (each process
# holds its own memory and database connections). Four associations on two CPUs, one, two
# and four receivers: 0.46x, 0.64x and 0.74x of storescp's throughput (docs/benchmarks.md).
AUTOMATIC_RECEIVERS = 4
MOST_AUTOMATIC_RECEIVERS = 8


def automatic_receivers() -> int:
    """Receiver processes for `dicom.receivers: auto`: with one CPU to run on, receive in the
    node's own process; else one per CPU, at least 4 and at most 8."""
    cpus = len(os.sched_getaffinity(0))  # the CPUs this process may run on (Linux)
    return 1 if cpus == 1 else min(max(cpus, AUTOMATIC_RECEIVERS), MOST_AUTOMATIC_RECEIVERS)


class DicomSettings(Section):
    ae_title: AETitle = "CADNODE"
    # Loopback by default: the embedded node accepts any calling AE, so only local peers.
    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112
    max_associations: int = Field(default=16, ge=1)  # per receiver process
    # Receiver processes sharing the port (cadnode/port.py): more than one lets
    # concurrent associations run past the interpreter lock; 1 receives in the node's process.
    # "auto" (the default): `automatic_receivers()`, decided at load.
    receivers: int = Field(default="auto", ge=1, le=64, validate_default=True)
    # A peer silent this long (between messages or in the middle of a PDU) is aborted.
    network_timeout_s: float = Field(default=60, gt=0)
    # A connection whose whole association request has not arrived this long after it was
    # accepted is closed (one deadline, however the bytes trickle in); also how long the
    # node waits for a peer's answer to its own association requests and releases.
    acse_timeout_s: float = Field(default=30, gt=0)
    # One PDU's bytes, first to last, must arrive within this long (not per read: a peer
    # sending a byte now and then is cut off too).
    pdu_timeout_s: float = Field(default=60, gt=0)
    # The largest association request accepted (PS3.8 A-ASSOCIATE-RQ, before the peer is
    # known); after association, a PDU longer than the node's negotiated maximum is aborted.
    max_request_pdu_kb: int = Field(default=256, ge=16, le=16384)
    # Connections that have not yet completed an association request wait here without a
    # thread, at most this many from one address and in all; past either the oldest waiting
    # one is closed (an honest modality sends its request at once).
    max_pending_per_address: int = Field(default=8, ge=1)
    max_pending: int = Field(default=128, ge=1)
    # On SIGTERM: how long running associations may take to finish before they are aborted.
    drain_timeout_s: float = Field(default=30, ge=0)
    # "events": associations block on their socket and queues (cadnode/ingest/reactor.py);
    # "stock": pynetdicom's own polling loops (also used where its version is not supported).
    reactor: Literal["events", "stock"] = "events"
    # Who may send: a calling AE title not listed here is rejected at association
    # (A-ASSOCIATE-RJ, calling AE title not recognised), as is a listed one from elsewhere.
    peers: list[Peer] = Field(default_factory=list)
    # Accept any calling AE title too, but only from these networks (default: loopback).
    accept_any_peer: bool = True
    any_peer_networks: list[str] = Field(default_factory=lambda: list(LOOPBACK_NETWORKS))
    tls: TlsSettings | None = None

    @field_validator("any_peer_networks")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_network(value, strict=False)  # ValueError names the bad one
        return values

    @field_validator("receivers", mode="before")
    @classmethod
    def _receivers(cls, value: Any) -> Any:
        if value == "auto":
            return automatic_receivers()
        if isinstance(value, str) and not value.strip().isdigit():
            raise ValueError(f"a number of receiver processes, or auto (got {value!r})")
        return value


class HttpTlsSettings(Section):
    """HTTPS for the admin port; without it the port serves plain HTTP (loopback by default)."""

    certificate: Path  # PEM: the node's certificate, then any intermediates
    private_key: Path  # PEM, not encrypted
    # PEM CA certificate(s): set, every client (browsers, probes, DICOMweb clients) must
    # present a certificate one of them signed (mutual TLS); the token is still required.
    client_ca: Path | None = None


class HttpSettings(Section):
    """The admin port: health, metrics and the dashboard (cadnode.admin)."""

    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # Argon2 hashes (`cadnode hash-password`) of the dashboard's password and of a bearer
    # token (for Prometheus and scripts). Neither set: every admin page and /metrics refuse.
    admin_password_hash: str | None = Field(default=None, pattern=r"^\$argon2(id|i|d)\$")
    admin_token_hash: str | None = Field(default=None, pattern=r"^\$argon2(id|i|d)\$")
    # Mark the session cookie Secure (sent over HTTPS only). Unset: Secure exactly when `tls`
    # is set; set true behind a TLS-terminating proxy.
    secure_cookie: bool | None = None
    session_max_age_s: int = Field(default=8 * 3600, ge=60)
    # The largest request body any endpoint reads (a DICOM file for `/rules/explain`);
    # forms are held to `max_form_kb`. Bigger: 413 before a byte of it is stored.
    max_upload_mb: float = Field(default=64, gt=0)
    max_form_kb: int = Field(default=64, ge=1)
    # Password and token checks (Argon2, 64 MiB each) run this many at once, off the event loop;
    # one keeps a flood of wrong ones under 100 MB (docs/security.md).
    auth_workers: int = Field(default=1, ge=1, le=16)
    # Failed logins or tokens from one address: past this many a minute, 429 with Retry-After.
    auth_failures_per_minute: int = Field(default=10, ge=1)
    tls: HttpTlsSettings | None = None


ArgonHash = Annotated[str, StringConstraints(pattern=r"^\$argon2(id|i|d)\$")]
# Client names the node itself uses: the admin token's holder, a logged-in dashboard.
ADMIN_CLIENT = "ADMIN"
DASHBOARD_CLIENT = "DASHBOARD"


class DicomwebSettings(Section):
    """DICOMweb on the admin port, under /dicomweb (STOW-RS, QIDO-RS, WADO-RS)."""

    # Named clients and the Argon2 hash of each one's bearer token (`cadnode hash-password`).
    # A name is an AE title: it is recorded in the audit trail and is the calling AE title of
    # the instances the client stores, so routing rules match on it. The admin token
    # (`http.admin_token_hash`) is accepted too, as client ADMIN.
    clients: dict[AETitle, ArgonHash] = Field(default_factory=dict)
    # A STOW-RS request body: a declared Content-Length over it is refused unread (413), a
    # chunked body is cut where it passes it. One part (one instance): `max_part_mb`.
    max_request_mb: float = Field(default=2048, gt=0)
    max_part_mb: float = Field(default=1024, gt=0)
    # STOW-RS requests stored at once (each holds a worker thread and a scratch file); more:
    # 503 with Retry-After, before the body is read. A body that sends nothing for
    # `read_timeout_s` is cut off (408).
    max_requests: int = Field(default=4, ge=1, le=64)
    read_timeout_s: float = Field(default=60, gt=0)
    # Origins (scheme://host[:port]) of web viewers on another origin allowed to call
    # /dicomweb from a browser (CORS). Empty: no CORS headers, same-origin only.
    cors_origins: list[str] = Field(default_factory=list)
    # QIDO-RS: matches per response without `limit`, and the most `limit` may ask for.
    search_default_limit: int = Field(default=100, ge=1)
    search_max_limit: int = Field(default=1000, ge=1)
    # WADO-RS: the most instances one retrieve streams (more: 413, ask per series), and the
    # most frames one /frames request names.
    retrieve_max_instances: int = Field(default=2000, ge=1)
    retrieve_max_frames: int = Field(default=1000, ge=1)

    @field_validator("clients")
    @classmethod
    def _names_free(cls, clients: dict[str, str]) -> dict[str, str]:
        taken = {ADMIN_CLIENT, DASHBOARD_CLIENT} & {name.strip() for name in clients}
        if taken:
            raise ValueError(f"client names reserved by the node: {sorted(taken)}")
        return clients

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def max_part_bytes(self) -> int:
        return int(self.max_part_mb * 2**20)


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

    @property
    def answers(self) -> Path:
        """Engine outputs too big for the database (segmentation masks; cadnode.infer.answers)."""
        return self.data_dir / "answers"

    @property
    def quarantine(self) -> Path:
        """Spool files found at startup that are not whole DICOM objects."""
        return self.data_dir / "quarantine"

    # Below this much free space where the spool lies, C-STORE answers 0xA700 (out of resources).
    min_free_mb: float = Field(default=1024, ge=0)
    # true: an instance is durable by an append to the spool's journal and one fdatasync
    # (cadnode/ingest/journal.py); false: its file is fsynced, renamed, its folder fsynced.
    spool_journal: bool = True


class DatabaseSettings(Section):
    """Where the node's state is: unset, SQLite in `storage.data_dir` (the embedded default);
    or a PostgreSQL database shared by several processes or nodes, as an SQLAlchemy URL
    (`postgresql+psycopg://USER@HOST:PORT/DATABASE`; a password is better kept in
    ~/.pgpass or PGPASSFILE than here). See cadnode/core/connection.py."""

    url: str | None = None

    @field_validator("url")
    @classmethod
    def _accepted(cls, value: str | None) -> str | None:
        if value is not None:
            connection.parse(value)  # ValueError: what is wrong, never the password
        return value


_AGE = re.compile(r"^(?P<number>\d+(\.\d+)?)\s*(?P<unit>[smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _age(value: Any) -> Any:
    """An age as people write it ("90d", "12h", "30m", "45s", "2w"); "never" or null: none."""
    if value is None or value == "never":
        return None
    if isinstance(value, dt.timedelta):
        return value
    match = _AGE.match(value.strip()) if isinstance(value, str) else None
    if match is None:  # a bare number too: 30 what?
        raise ValueError("expected a duration with its unit (90d, 12h, 30m, 45s) or never")
    seconds = float(match["number"]) * _UNIT_SECONDS[match["unit"]]
    if seconds <= 0:
        raise ValueError("a duration longer than 0 (never: kept for good)")
    return dt.timedelta(seconds=seconds)


Age = Annotated[dt.timedelta | None, BeforeValidator(_age)]


def _duration_s(value: Any) -> Any:
    """A duration written as an age is ("90s", "30m", "1h", "7d"), in seconds; not never."""
    if isinstance(value, float):
        return value  # a default, already in seconds
    try:
        age = _age(value)
    except ValueError:
        age = None
    if age is None:
        raise ValueError("expected a duration longer than 0 with its unit (90s, 30m, 1h, 7d)")
    return age.total_seconds()


# A threshold or interval in the file ("30m"), held as seconds.
Duration = Annotated[float, BeforeValidator(_duration_s)]


class RetentionSettings(Section):
    """Housekeeping (cadnode.retain): how long each kind of data is kept once its study is
    finished, and a disk high-water mark (docs/operations.md#retention)."""

    # Counted from the last change of the study's last job version (its end: delivered,
    # ignored, failed); a duration ("30d", "12h", "30m", "45s") or never.
    images: Age = dt.timedelta(days=30)  # received images: the spool
    results: Age = dt.timedelta(days=90)  # cadnode's own objects (SR, SEG, GSPS, SC)
    answers: Age = dt.timedelta(days=90)  # engine answers: Result rows and mask files
    jobs: Age = dt.timedelta(days=365)  # the study's rows: jobs, deliveries, priorities...
    audit: Age = dt.timedelta(days=2192)  # audit events: six years, leap days included
    # Above this share of the data dir's filesystem in use, the oldest deletable files go
    # first, whatever their age, until use is below low_water_percent. 100: never.
    high_water_percent: float = Field(default=85, gt=0, le=100)
    low_water_percent: float = Field(default=75, gt=0, le=100)
    check_every_s: float = Field(default=300, gt=0)

    @model_validator(mode="after")
    def _low_below_high(self) -> RetentionSettings:
        if self.low_water_percent >= self.high_water_percent:
            raise ValueError("low_water_percent must be below high_water_percent")
        return self


class LimitsSettings(Section):
    """What one object may cost the node to decode (docs/security.md)."""

    # Decoded pixel data (rows x columns x samples x frames x bits allocated) any decode path
    # may produce: inference, Q/R transcoding, thumbnails, overlays, `rules explain`. Larger
    # images fail their job naming this limit instead of being decoded.
    max_decoded_image_mb: float = Field(default=2048, gt=0)
    # A Deflated Explicit VR Little Endian dataset is inflated as a stream; larger, C-STORE
    # answers 0xA700 (out of resources) and the association goes on.
    max_inflated_mb: float = Field(default=512, gt=0)

    @property
    def max_decoded_image_bytes(self) -> int:
        return int(self.max_decoded_image_mb * 2**20)

    @property
    def max_inflated_bytes(self) -> int:
        return int(self.max_inflated_mb * 2**20)


class AssembleSettings(Section):
    # Seconds without a new instance before a multi-image study is released (a routing rule
    # may set its own); every instance restarts it. A single radiograph is released at once.
    quiet_period_s: float = Field(default=3.0, ge=0, le=3600)
    # Release a study as soon as the association that sent it is released (not aborted),
    # rather than waiting out the quiet period: for senders that push one study per association.
    close_on_association_release: bool = False
    # Release a study when the modality's MPPS says COMPLETED and every image it lists arrived.
    close_on_mpps_completed: bool = True


class DispatchSettings(Section):
    max_attempts: int = Field(default=10, ge=1)
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)
    # Storage Commitment: ask again when no answer came within this long, up to this many
    # requests in all; then the delivery stays sent, its commitment marked as failed.
    commitment_timeout_s: float = Field(default=600.0, gt=0)
    commitment_max_requests: int = Field(default=3, ge=1)

    @property
    def backoff(self) -> Backoff:
        """The retry schedule of both outboxes (deliveries and worklist publications)."""
        return Backoff(
            initial_s=self.backoff_initial_s,
            max_s=self.backoff_max_s,
            max_attempts=self.max_attempts,
        )


Backend = Literal["auto", "onnxruntime", "tensorrt"]
# triton names a server per engine (`engines.options.NAME.triton`), so only an engine takes it.
EngineBackend = Literal["auto", "onnxruntime", "tensorrt", "triton"]


class TritonOptions(Section):
    """The NVIDIA Triton Inference Server an engine with `backend: triton` is served by."""

    # host:port of the server's HTTP (Triton's default 8000) or gRPC (8001) endpoint.
    url: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")]
    protocol: Literal["http", "grpc"] = "http"
    # The model's name on the server; unset: the engine's name, as export-triton names it.
    model: str | None = None
    # The model version; "" lets the server pick by its version policy (the latest).
    version: str = ""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # One request to the server; the engine's `timeout_s` still bounds the whole call.
    request_timeout_s: float = Field(default=60.0, gt=0)


class EngineOptions(Section):
    """How one engine is run (`engines.options.NAME`); unset fields take `engines`' values."""

    # auto: TensorRT when a GPU and TensorRT are usable, else ONNX Runtime; triton: the
    # server named in `triton`.
    backend: EngineBackend | None = None
    triton: TritonOptions | None = None
    # Images per model call where the task allows it (chest films); a DBT volume's slices
    # are one call of up to this many slices each.
    max_batch: int = Field(default=8, ge=1)
    # Engine calls of this engine running at once (other engines are not held back by it).
    concurrency: int = Field(default=1, ge=1)
    # An engine call that takes longer fails its job (retried per `engines.max_attempts`).
    timeout_s: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _triton_needs_its_server(self) -> EngineOptions:
        if self.backend == "triton" and self.triton is None:
            raise ValueError("backend triton needs `triton: {url: HOST:PORT}` (the server)")
        return self


class EngineSettings(Section):
    dir: Path = Path("engines")
    backend: Backend = "auto"
    # A job whose engine fails is retried this many times in all, with back-off, then failed.
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_s: float = Field(default=5.0, gt=0)
    options: dict[str, EngineOptions] = Field(default_factory=dict)

    @property
    def backoff(self) -> Backoff:
        """The retry schedule of a job whose engine failed (no ceiling: attempts are few)."""
        return Backoff(initial_s=self.retry_backoff_s, max_attempts=self.max_attempts)

    def for_engine(self, name: str) -> EngineOptions:
        """The engine's own options, its backend defaulting to `engines.backend`."""
        options = self.options.get(name, EngineOptions())
        return options.model_copy(update={"backend": options.backend or self.backend})


class ResultsSettings(Section):
    destinations: list[str] = Field(default_factory=list)


class UpsTurnaround(Section):
    """How soon a reading is expected at each priority (a workitem's Expected Completion
    DateTime, from its scheduled start): a STAT read within the hour, a routine one within
    the day, a confidently normal one later."""

    HIGH: Duration = 3600.0
    MEDIUM: Duration = 86400.0
    LOW: Duration = 3 * 86400.0

    def of(self, priority: str) -> dt.timedelta:
        seconds: float = getattr(self, priority)
        return dt.timedelta(seconds=seconds)


class UpsSettings(Section):
    """cadnode's reading worklist as UPS (DICOM Unified Procedure Step)."""

    # Serve UPS Pull, Watch and Query on the node's DICOM port.
    enabled: bool = True
    worklist_label: str = Field(default="CADNODE", min_length=1, max_length=64)
    # Destinations (external UPS Push SCPs) given each workitem (N-CREATE) and its changes (N-SET).
    push: list[str] = Field(default_factory=list)
    turnaround: UpsTurnaround = UpsTurnaround()


class Hl7Codes(Section):
    """The HL7 priority code (tables 0027 / 0485) sent for each cadnode priority."""

    HIGH: str = Field(default="S", min_length=1)
    MEDIUM: str = Field(default="R", min_length=1)
    LOW: str = Field(default="R", min_length=1)


class Hl7Publisher(Section):
    """A RIS that takes order updates (HL7 v2 over MLLP) carrying the priority."""

    enabled: bool = True
    host: str
    port: Port
    message: Literal["OMI^O23", "ORM^O01"] = "OMI^O23"
    sending_application: str = "CADNODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    codes: Hl7Codes = Hl7Codes()
    timeout_s: float = Field(default=10.0, gt=0)


class WebhookPublisher(Section):
    """An HTTP endpoint that is POSTed a JSON document for each priority change."""

    enabled: bool = True
    url: str = Field(pattern=r"^https?://\S+$")
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(default=10.0, gt=0)


class PrioritySettings(Section):
    # The policy mapping results to HIGH / MEDIUM / LOW; default: the shipped priority.yaml.
    policy: Path | None = None
    # Also send the arrival's MEDIUM to HL7 and webhooks. Off: it says nothing about the study
    # and would overwrite a priority the RIS already holds (a STAT order from the ED).
    publish_arrival: bool = False
    ups: UpsSettings = UpsSettings()
    hl7: dict[str, Hl7Publisher] = Field(default_factory=dict)
    webhooks: dict[str, WebhookPublisher] = Field(default_factory=dict)

    @property
    def policy_file(self) -> Path:
        return self.policy or EMBEDDED_CONFIG.parent / "priority.yaml"


class SmtpSettings(Section):
    """The mail relay alert emails go through (`alerts.smtp`), by Python's smtplib."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    host: str = Field(min_length=1)
    port: Port = 25
    from_: str = Field(alias="from", pattern=r"^[^@\s]+@[^@\s]+$")
    to: list[Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$")]] = Field(min_length=1)
    # Upgrade the connection with STARTTLS (the relay's certificate is verified) before login.
    starttls: bool = False
    # Log in as `username` with the password held in `password_file` (read at each send and
    # never logged); neither set: send without logging in.
    username: str | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _login_whole(self) -> SmtpSettings:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together: set both or neither")
        if self.password_file is not None and not self.password_file.is_file():
            raise ValueError(f"password_file {str(self.password_file)!r} is not a file")
        return self


class AlertSettings(Section):
    """Watchdogs on stalls (cadnode.watch): each condition raises an alert once it lasts
    past its threshold, and clears it when it ends (docs/operations.md#alerts)."""

    enabled: bool = True
    check_every: Duration = 60.0
    # A job in one unfinished state this long (received: this long past its quiet period).
    job_stalled: Duration = 3600.0
    # A destination failing every attempt (nothing accepted since) this long.
    destination_failing: Duration = 3600.0
    # Per calling AE title, the silence allowed before its alert, or "off" for never; other
    # senders' usual silences are learned from their last `sender_history` of studies.
    senders: dict[AETitle, Literal["off"] | Duration] = Field(default_factory=dict)
    learn_senders: bool = True
    sender_history: Duration = 28 * 86400.0
    sender_min_studies: int = Field(default=20, ge=2)
    # Silent past `sender_factor` times this quantile of its silences at this time of day on
    # this kind of day (working day, weekend), and past `sender_min_silence`.
    sender_quantile: float = Field(default=0.9, gt=0, le=1)
    sender_factor: float = Field(default=2.0, ge=1)
    sender_min_silence: Duration = 1800.0
    # Free space falling fast enough to reach `storage.min_free_mb` within `disk_horizon`,
    # by its trend over the last `disk_window`.
    disk_horizon: Duration = 86400.0
    disk_window: Duration = 6 * 3600.0
    # Notifications of each alert raised and cleared: a JSON POST, and email.
    webhook_url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    webhook_headers: dict[str, str] = Field(default_factory=dict)
    notify_timeout: Duration = 10.0
    smtp: SmtpSettings | None = None


class DriftReferenceWindow(Section):
    """A fixed reference window: the images profiled from `start` to `end` (ISO times)."""

    start: dt.datetime
    end: dt.datetime

    @model_validator(mode="after")
    def _ordered(self) -> DriftReferenceWindow:
        if self.end <= self.start:
            raise ValueError("end must come after start")
        return self


class DriftSettings(Section):
    """Drift of each sender's inputs and each engine's outputs (cadnode.watch.drift): PSI per
    input attribute and of the probability histogram, and Kolmogorov-Smirnov on the
    probabilities, against a reference window and the bundle's training population
    (docs/silent-trial.md#drift). Raised through the alerts (`alerts.*`)."""

    enabled: bool = True
    check_every: Duration = 3600.0
    # PSI: under psi_watch stable, from it "watch" (shown), from psi_alert an alert; the
    # usual convention is 0.1 and 0.25. A raised alert clears once every PSI is under
    # psi_watch and every KS p-value is at or over ks_p_clear.
    psi_watch: float = Field(default=0.1, gt=0)
    psi_alert: float = Field(default=0.25, gt=0)
    ks_p_alert: float = Field(default=0.01, gt=0, lt=1)
    ks_p_clear: float = Field(default=0.05, gt=0, lt=1)
    # Fewer images than this in a window (current or reference): not compared.
    min_images: int = Field(default=50, ge=2)
    # The current window: a sender's images for the engine over the last `window`, the
    # most recent `window_images` of them.
    window: Duration = 7 * 86400.0
    window_images: int = Field(default=1000, ge=2)
    # "first": each engine version's first `reference_images` images from the sender;
    # or a fixed window {start, end}.
    reference: Literal["first"] | DriftReferenceWindow = "first"
    reference_images: int = Field(default=500, ge=2)
    # Compare with the training population the bundle's manifest records (`population`).
    training: bool = True
    # Senders x engines compared per check at most (the busiest first): bounds a check.
    max_series: int = Field(default=200, ge=1)

    @model_validator(mode="after")
    def _levels_ordered(self) -> DriftSettings:
        if self.psi_alert < self.psi_watch:
            raise ValueError("psi_alert must be at least psi_watch")
        if self.ks_p_clear < self.ks_p_alert:
            raise ValueError("ks_p_clear must be at least ks_p_alert")
        return self


class NodeSettings(Section):
    """This node among others sharing the database (docs/operations.md, "Several nodes")."""

    # Unique among the nodes; default: the host's name. Workers are "<name>/<pid>".
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[^/\s]+$")
    # How long a claim on a job, delivery or publication lasts unrenewed: a killed node's
    # work is taken over after about this long (renewed every lease_s / 3 while working).
    lease_s: float = Field(default=60.0, ge=1, le=3600)
    # How often each process writes its heartbeat (`cadnode status`, the dashboard).
    heartbeat_s: float = Field(default=5.0, gt=0, le=300)
    # Processes running the CPU-bound stages (infer, encode: cadnode/workers.py); 1 runs
    # them in the node's process beside the others. More than 1 uses more of the machine's
    # cores past the interpreter lock (one per core, with the main process, is the most
    # that helps); each worker loads the engines, so engine memory is paid per worker.
    workers: int = Field(default=1, ge=1, le=64)


class FeedbackMllp(Section):
    """The HL7 v2 listener for final reports (ORU^R01 over MLLP; cadnode.feedback.mllp)."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 2575
    # Who may send: addresses or networks (10.1.2.0/24) the connection comes from, and the
    # sending facilities (MSH-4) a message may name. Either list empty: no check on it.
    allowed_networks: list[str] = Field(default_factory=lambda: list(LOOPBACK_NETWORKS))
    allowed_facilities: list[str] = Field(default_factory=list)
    # A message longer than this is answered AR and the connection closed, unread past it.
    max_message_kb: int = Field(default=256, ge=1, le=65536)
    max_connections: int = Field(default=8, ge=1, le=256)
    # A connection silent this long (between messages, or within one) is closed.
    timeout_s: float = Field(default=60.0, gt=0)

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_network(value, strict=False)  # ValueError names the bad one
        return values


class FeedbackSettings(Section):
    """Radiologists' conclusions as ground truth (cadnode.feedback; docs/silent-trial.md)."""

    # The findings a report is read for and the engine labels they are the truth of; default:
    # the shipped config/feedback.yaml.
    findings: Path | None = None
    mllp: FeedbackMllp = FeedbackMllp()
    # RIS clients of POST /api/feedback: name -> the Argon2 hash of its bearer token
    # (`cadnode hash-password`). The name is recorded as the feedback's author.
    api_clients: dict[AETitle, ArgonHash] = Field(default_factory=dict)
    # The figures (dashboard, /metrics) read the feedback of this long back, at most
    # `max_rows` conclusions (the latest), so a scrape's cost is bounded.
    window: Duration = 90 * 86400.0
    max_rows: int = Field(default=20000, ge=1)

    @property
    def findings_file(self) -> Path:
        return self.findings or EMBEDDED_CONFIG.parent / "feedback.yaml"


class Settings(Section):
    node: NodeSettings = NodeSettings()
    dicom: DicomSettings = DicomSettings()
    http: HttpSettings = HttpSettings()
    dicomweb: DicomwebSettings = DicomwebSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    limits: LimitsSettings = LimitsSettings()
    assemble: AssembleSettings = AssembleSettings()
    dispatch: DispatchSettings = DispatchSettings()
    engines: EngineSettings = EngineSettings()
    rules: Path = Path("rules.yaml")
    destinations: dict[str, AnyDestination] = Field(default_factory=dict)
    results: ResultsSettings = ResultsSettings()
    priority: PrioritySettings = PrioritySettings()
    retention: RetentionSettings = RetentionSettings()
    alerts: AlertSettings = AlertSettings()
    drift: DriftSettings = DriftSettings()
    feedback: FeedbackSettings = FeedbackSettings()

    @model_validator(mode="after")
    def _destinations_exist(self) -> Settings:
        unknown = [name for name in self.results.destinations if name not in self.destinations]
        if unknown:
            raise ValueError(f"results.destinations names unknown destinations: {unknown}")
        unknown = [name for name in self.priority.ups.push if name not in self.destinations]
        if unknown:
            raise ValueError(f"priority.ups.push names unknown destinations: {unknown}")
        web = [n for n in self.priority.ups.push if n not in self.dicom_destinations()]
        if web:
            raise ValueError(f"priority.ups.push names DICOMweb destinations (no UPS): {web}")
        return self

    def dicom_destinations(self) -> dict[str, Destination]:
        """The destinations reached by DIMSE (AE title, host, port), by name: those a C-MOVE,
        a UPS event or a Storage Commitment can go to."""
        return {n: d for n, d in self.destinations.items() if isinstance(d, Destination)}

    @property
    def database_url(self) -> URL:
        """The database the node uses: `database.url`, else SQLite in the data dir."""
        if self.database.url is not None:
            return connection.parse(self.database.url)
        return connection.of(self.storage.database)

    def result_destinations(self) -> list[AnyDestination]:
        return [self.destinations[name] for name in self.results.destinations]

    def named_result_destinations(self) -> dict[str, AnyDestination]:
        """`results.destinations` by name: the name is what a Delivery row records."""
        return {name: self.destinations[name] for name in self.results.destinations}


ResolvedPath = Annotated[Path, AfterValidator(Path.resolve)]  # a relative one: to the cwd


class Environment(BaseSettings):
    """The environment variables (docs/operations.md), read and typed by pydantic-settings.

    Each field is named for the key of the file that its variable (the alias) replaces, with
    `__` between the section and the key; `destination` replaces `results.destinations`.
    """

    model_config = SettingsConfigDict(case_sensitive=True)

    config: ResolvedPath = Field(EMBEDDED_CONFIG, alias="CADNODE_CONFIG")
    storage__data_dir: ResolvedPath | None = Field(None, alias="CADNODE_DATA_DIR")
    dicom__port: int | None = Field(None, alias="CADNODE_DICOM_PORT")
    dicom__ae_title: str | None = Field(None, alias="CADNODE_AE_TITLE")
    dicom__receivers: int | Literal["auto"] | None = Field(None, alias="CADNODE_DICOM_RECEIVERS")
    dicom__reactor: Literal["events", "stock"] | None = Field(None, alias="CADNODE_DICOM_REACTOR")
    storage__spool_journal: bool | None = Field(None, alias="CADNODE_SPOOL_JOURNAL")
    node__workers: int | None = Field(None, alias="CADNODE_WORKERS")
    node__name: str | None = Field(None, alias="CADNODE_NODE_NAME")
    node__lease_s: float | None = Field(None, alias="CADNODE_LEASE_S")
    http__port: int | None = Field(None, alias="CADNODE_HTTP_PORT")
    http__admin_password_hash: str | None = Field(None, alias="CADNODE_ADMIN_PASSWORD_HASH")
    engines__dir: ResolvedPath | None = Field(None, alias="CADNODE_ENGINES_DIR")
    database__url: str | None = Field(None, alias="CADNODE_DATABASE_URL")
    destination: Destination | None = Field(None, alias="CADNODE_DESTINATION")

    @field_validator("*", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value == "":
            raise ValueError("set but empty")
        return value

    @field_validator("destination", mode="before")
    @classmethod
    def _ae_at_host_port(cls, value: Any) -> Any:
        return _address(value) if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # what `read` passes from its mapping

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> Environment:
        """The variables of `environ` (tests pass dicts), never os.environ behind its back."""
        names = {str(field.alias) for field in cls.model_fields.values()}
        given: dict[str, Any] = {name: v for name, v in environ.items() if name in names}
        try:
            return cls(**given)
        except ValidationError as error:
            raise ConfigError([problem(e) for e in error.errors()]) from error

    def overrides(self) -> dict[tuple[str, ...], tuple[str, Any]]:
        """Keys of the file -> (the variable that replaces it, its value), for those set."""
        found = {
            tuple(name.split("__")): (str(field.alias), value)
            for name, field in type(self).model_fields.items()
            if "__" in name and (value := getattr(self, name)) is not None
        }
        if self.destination is not None:
            name = ENVIRONMENT_DESTINATION  # also the name of the destination it describes
            found[("destinations", name)] = (name, self.destination)
            found[("results",)] = (name, {"destinations": [name]})
        return found


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    environment = Environment.read(os.environ if environ is None else environ)
    path = environment.config
    document = read_yaml(path)
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError([f"{path}:1:1: expected a mapping of sections at the top level"])
    _resolve_relative_paths(document, path.parent)
    overrides = environment.overrides()
    for keys, (_, value) in overrides.items():
        node = _parent(document, keys, create=True)
        if node is not None:  # else the file's own error is reported, at its line
            node[keys[-1]] = value
    origins = {keys: variable for keys, (variable, _) in overrides.items()}
    return load_model(path, Settings, document, origins)


def _resolve_relative_paths(document: dict[str, Any], base: Path) -> None:
    tls = ("certificate", "private_key", "client_ca")
    for keys in (
        ("storage", "data_dir"),
        ("engines", "dir"),
        ("rules",),
        ("priority", "policy"),
        ("feedback", "findings"),
        ("alerts", "smtp", "password_file"),
        *(("dicom", "tls", key) for key in tls),
        *(("http", "tls", key) for key in tls[:2]),
        *_destination_files(document),
    ):
        parent = _parent(document, keys)
        value = parent.get(keys[-1]) if parent is not None else None
        if isinstance(value, str) and not Path(value).is_absolute():
            parent[keys[-1]] = str((base / value).resolve())  # type: ignore[index]
    if "rules" not in document:
        document["rules"] = str((base / "rules.yaml").resolve())
    _resolve_sqlite_file(document, base)


def _resolve_sqlite_file(document: dict[str, Any], base: Path) -> None:
    """A relative file in an `sqlite:///` database.url, as the file's other paths: from the
    file's folder, not from wherever the node happens to be started."""
    parent = _parent(document, ("database", "url"))
    value = parent.get("url") if parent is not None else None
    if parent is None or not isinstance(value, str):
        return
    try:
        url = connection.parse(value)
    except ValueError:
        return  # reported, at its line, when the section is validated
    file = connection.sqlite_file(url)
    if file is not None and not file.is_absolute():
        resolved = url.set(database=str((base / file).resolve()))
        parent["url"] = resolved.render_as_string(hide_password=False)


def _destination_files(document: dict[str, Any]) -> list[tuple[str, ...]]:
    """The keys of the files a DICOMweb destination names (its CA, its secrets)."""
    destinations = document.get("destinations")
    names = list(destinations) if isinstance(destinations, dict) else []
    return [
        ("destinations", name, *keys)
        for name in names
        for keys in (("ca_file",), ("auth", "bearer_token_file"), ("auth", "password_file"))
    ]


def _parent(
    document: dict[str, Any], keys: tuple[str, ...], create: bool = False
) -> dict[str, Any] | None:
    node: Any = document
    for key in keys[:-1]:
        if create and isinstance(node, dict):
            node = node.setdefault(key, {})
        else:
            node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None
