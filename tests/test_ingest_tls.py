"""DICOM TLS on the node's port, with and without client certificates, against DCMTK's storescu.

A throwaway CA signs the node's certificate and a modality's; storescu verifies the node's
certificate against the CA. With `client_ca` set, a peer without a certificate the CA signed
is refused at the handshake; without it, any TLS client may send.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom.uid import CTImageStorage

from cadnode.core.db import Database
from tests.ingest import receiving
from tests.peers import storescu
from tests.synthetic import write_image


def issue(
    folder: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A key and certificate for `name`, signed by `issuer` (self-signed, a CA, without one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (folder / f"{name}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return certificate, key


def make_pki(folder: Path) -> Path:
    """A CA, and the node's and a modality's certificates signed by it, in `folder`."""
    ca = issue(folder, "ca", None)
    issue(folder, "cadnode", ca)
    issue(folder, "modality", ca)
    return folder


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Path, *, mutual: bool) -> dict[str, object]:
    tls = {"certificate": pki / "cadnode.crt", "private_key": pki / "cadnode.key"}
    if mutual:
        tls["client_ca"] = pki / "ca.crt"
    return {"tls": tls}


def storescu_tls(port: int, image: Path, pki: Path, *, client_certificate: bool) -> str:
    who = (
        ("+tls", str(pki / "modality.key"), str(pki / "modality.crt"))
        if client_certificate
        else ("+tla",)  # TLS without a certificate of its own
    )
    done = storescu(port, image, options=(*who, "+cf", str(pki / "ca.crt"), "-v"))
    return f"rc={done.returncode}\n{done.stderr}"


def test_mutual_tls_accepts_a_certified_modality_only(
    pki: Path, tmp_path: Path, database: Database
) -> None:
    image = tmp_path / "ct.dcm"
    write_image(image, CTImageStorage, "CT")
    with receiving(tmp_path, database, dicom=tls_settings(pki, mutual=True)) as node:
        accepted = storescu_tls(node.port, image, pki, client_certificate=True)
        anonymous = storescu_tls(node.port, image, pki, client_certificate=False)
        plain = storescu(node.port, image)
    assert accepted.startswith("rc=0") and "Received Store Response (Success)" in accepted
    assert not anonymous.startswith("rc=0"), anonymous
    assert plain.returncode != 0, "plain TCP must not reach a TLS port"


def test_tls_without_client_certificates_accepts_any_tls_client(
    pki: Path, tmp_path: Path, database: Database
) -> None:
    image = tmp_path / "ct.dcm"
    write_image(image, CTImageStorage, "CT")
    with receiving(tmp_path, database, dicom=tls_settings(pki, mutual=False)) as node:
        anonymous = storescu_tls(node.port, image, pki, client_certificate=False)
    assert "Received Store Response (Success)" in anonymous, anonymous


def test_a_stalled_tls_handshake_holds_up_nobody(
    pki: Path, tmp_path: Path, database: Database
) -> None:
    image = tmp_path / "ct.dcm"
    write_image(image, CTImageStorage, "CT")
    # The silent peer is cut off only after 30 s: a store taking less than half of that did
    # not wait on it, however loaded the machine.
    settings = {**tls_settings(pki, mutual=True), "network_timeout_s": 30, "acse_timeout_s": 30}
    with receiving(tmp_path, database, dicom=settings) as node:
        silent = socket.create_connection(("127.0.0.1", node.port))  # connects, never says hello
        start = time.monotonic()
        accepted = storescu_tls(node.port, image, pki, client_certificate=True)
        assert time.monotonic() - start < 15, "the certified modality waited on the silent one"
        silent.close()
    assert "Received Store Response (Success)" in accepted, accepted
