"""The blob server's TLS sending (addon/blobserver/server.py): kTLS detected, and a context that
asks for it only where the kernel offers it; on sockets in this process."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hubcache.blobserver import server as blobserver


def test_ktls_is_offered_only_by_a_kernel_listing_the_tls_ulp(tmp_path):
    ulp = tmp_path / "tcp_available_ulp"
    ulp.write_text("mptcp\n")
    assert not blobserver.ktls_offered(ulp)
    ulp.write_text("mptcp tls\n")
    assert blobserver.ktls_offered(ulp) == hasattr(ssl, "OP_ENABLE_KTLS")
    assert not blobserver.ktls_offered(tmp_path / "absent"), "no such file: an old or foreign kernel"


def _credentials_fd() -> int:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blobs.hubcache.invalid")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    fd = os.memfd_create("test-credentials")
    os.write(fd, cert.public_bytes(serialization.Encoding.PEM))
    os.write(fd, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return fd


def test_the_context_asks_for_ktls_only_where_offered_and_hands_out_session_tickets():
    with_ktls = blobserver.server_context(_credentials_fd(), ktls=True)
    without = blobserver.server_context(_credentials_fd(), ktls=False)
    assert with_ktls.options & ssl.OP_ENABLE_KTLS
    assert not without.options & ssl.OP_ENABLE_KTLS
    assert with_ktls.num_tickets == without.num_tickets == blobserver.TICKETS >= 1


def test_a_socket_without_ktls_is_written_by_openssl():
    left, right = socket.socketpair()
    with left, right:
        assert not blobserver.kernel_tls(left), "no kernel TLS: sendfile(2) would send plaintext"


def test_the_client_chooses_the_cipher():
    """A Go client on AES hardware lists AES-128-GCM first; OpenSSL's own order would give it AES-256."""
    server = blobserver.server_context(_credentials_fd(), ktls=False)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2  # the one version whose order Python can set
    client.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    left, right = socket.socketpair()
    chosen: list[str] = []

    def serve() -> None:
        with server.wrap_socket(left, server_side=True) as tls:
            chosen.append(tls.cipher()[0])

    thread = threading.Thread(target=serve)
    thread.start()
    with client.wrap_socket(right) as tls:
        tls.do_handshake()
    thread.join(timeout=20)
    assert chosen == ["ECDHE-ECDSA-AES128-GCM-SHA256"]
