"""Who may associate with the node: the configured peers, and DICOM TLS.

An association request is checked before anything else happens on it. A calling AE title
that is not a configured peer, or a peer calling from an address it is not configured for,
is rejected with "calling AE title not recognised"; a called AE title other than the node's
with "called AE title not recognised" (PS3.8 9.3.4, A-ASSOCIATE-RJ). Accepting any calling
AE title is an explicit setting, limited to configured networks (loopback by default).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass

import structlog

from cadnode.core.config import DicomSettings, Peer, TlsSettings
from cadnode.core.yamlfile import ConfigError

log = structlog.get_logger("cadnode.ingest.admission")

# A-ASSOCIATE-RJ: result rejected-permanent, source service-user, and the two reasons.
REJECTED_PERMANENT = 0x01
SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Refusal:
    diagnostic: int  # the A-ASSOCIATE-RJ reason
    reason: str  # for the log: why, in words


class PeerPolicy:
    def __init__(self, dicom: DicomSettings) -> None:
        self.ae_title = dicom.ae_title.strip()
        self.peers = dicom.peers
        self.accept_any_peer = dicom.accept_any_peer
        self.any_peer_networks = [
            ipaddress.ip_network(n, strict=False) for n in dicom.any_peer_networks
        ]

    def refusal(self, calling_ae: str, called_ae: str, host: str) -> Refusal | None:
        """Why an association request must be rejected; None when it may go on."""
        if called_ae.strip() != self.ae_title:
            return Refusal(CALLED_AE_NOT_RECOGNISED, "called AE title is not this node's")
        address = _address(host)
        known = [peer for peer in self.peers if peer.ae_title.strip() == calling_ae.strip()]
        if any(_comes_from(peer, address) for peer in known):
            return None
        if known:
            return Refusal(CALLING_AE_NOT_RECOGNISED, "a configured peer, from another address")
        if self.accept_any_peer and any(address in net for net in self.any_peer_networks):
            return None
        return Refusal(CALLING_AE_NOT_RECOGNISED, "calling AE title is not a configured peer")


def _address(host: str) -> Address:
    address = ipaddress.ip_address(host.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return address


def _comes_from(peer: Peer, address: Address) -> bool:
    if peer.host is None:
        return True
    try:
        return address in ipaddress.ip_network(peer.host, strict=False)
    except ValueError:
        pass  # a host name: whatever it resolves to now
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(peer.host, None)}
    except OSError as error:
        log.warning("peer.unresolved", ae_title=peer.ae_title, host=peer.host, error=str(error))
        return False
    return any(_address(str(value)) == address for value in resolved)


def server_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """TLS for the DICOM port: TLS 1.2 or later (BCP 195), mutual when `client_ca` is set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
        if tls.client_ca is not None:
            context.load_verify_locations(tls.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise ConfigError([f"dicom.tls: cannot load the certificate or key: {error}"]) from error
    return context
