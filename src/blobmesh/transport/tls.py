"""TLS 1.3 contexts whose certificates carry node keys.

Python's :mod:`ssl` cannot be told to accept any certificate while still asking the client
for one: a server that requests client certificates always verifies them against its trust
store.  So every node certificate is issued by a *fleet-wide placeholder CA* whose private key
is derived from a public constant.  Anyone can issue such certificates, so chain verification
proves nothing and accepts any node, which is the intent ("no CA"); what authenticates the
peer is TLS's CertificateVerify (the peer holds the leaf's private key) plus our check that
the leaf's public key is the node id we expect (:func:`peer_node_id`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import os
import ssl
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from blobmesh.errors import PeerIdentityError
from blobmesh.transport.identity import Identity, NodeId

ALPN = "blobmesh/2"  # protocol version 2 (docs/wire.md); frame format 1

_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
_CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blobmesh placeholder CA v1")])


@functools.cache
def _ca_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(b"blobmesh placeholder CA v1; this key is public").digest())


@functools.cache
def placeholder_ca_pem() -> bytes:
    """The placeholder CA certificate (deterministic: Ed25519 signatures are)."""
    key = _ca_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_CA_NAME).issuer_name(_CA_NAME)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@functools.lru_cache(maxsize=64)
def node_certificate_pem(identity: Identity) -> bytes:
    """A certificate for ``identity``'s key (subject CN = its node id), made once."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity.node_id))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(_CA_NAME)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(_ca_key(), None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def make_context(identity: Identity, *, server: bool) -> ssl.SSLContext:
    """A TLS 1.3-only context presenting ``identity`` and requiring a peer certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=placeholder_ca_pem().decode("ascii"))
    ctx.set_alpn_protocols([ALPN])
    if server:
        # session tickets would only cost a post-handshake message; we never resume
        ctx.num_tickets = 0
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    # load_cert_chain reads only files: hand it pipes, so the key never touches a disk
    with _pipe(node_certificate_pem(identity)) as cert, _pipe(key_pem) as key:
        ctx.load_cert_chain(cert, key)
    return ctx


@contextlib.contextmanager
def _pipe(data: bytes) -> Iterator[str]:
    """A ``/dev/fd`` path from which ``data`` (a few KiB: fits the pipe buffer) can be read."""
    r, w = os.pipe()
    try:
        os.write(w, data)
        os.close(w)
        w = -1
        yield f"/dev/fd/{r}"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def peer_node_id(sock: ssl.SSLSocket | ssl.SSLObject) -> NodeId:
    """The node id in the peer's certificate, after checking ALPN and the key type."""
    if sock.selected_alpn_protocol() != ALPN:
        raise PeerIdentityError(f"peer did not negotiate ALPN {ALPN!r}")
    der = sock.getpeercert(binary_form=True)
    if der is None:
        raise PeerIdentityError("peer presented no certificate")
    key = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise PeerIdentityError("peer certificate does not carry an Ed25519 key")
    return NodeId(key.public_bytes_raw())
