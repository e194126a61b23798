"""The CA clients trust, made in mitmproxy's confdir on first start (`hubcache run`, `ca`, `setup`,
`prefetch`): mitmproxy's files under mitmproxy's names, so mitmproxy and every instruction find
them, but with an EC P-256 key where mitmproxy would make RSA 2048.

mitmproxy signs every TLS handshake it terminates with its CA's key (the key of the certificates
it makes for each host is the CA's). Go clients (dockerd, containerd, skopeo, podman) make a new
connection, and so a full handshake, for every request of a pull; an ECDSA P-256 signature costs
a fraction of an RSA 2048 one. A confdir that already holds a CA keeps it: clients trust it."""

from __future__ import annotations

import datetime
from pathlib import Path

BASENAME = "mitmproxy"
CA_CERT = f"{BASENAME}-ca-cert.pem"
VALIDITY = datetime.timedelta(days=3650)  # as mitmproxy's: clients trust it for years


def make_ca(confdir: Path, key_size: int | None = None) -> Path:
    """The CA certificate's path in `confdir`, made first if the confdir has no CA. With
    `key_size` (mitmproxy's option, when the operator set it) mitmproxy makes its RSA CA."""
    from mitmproxy.certs import CertStore

    confdir.mkdir(parents=True, exist_ok=True)
    if key_size is None and not (confdir / f"{BASENAME}-ca.pem").exists():
        _write_store(confdir)
    CertStore.from_store(str(confdir), BASENAME, key_size or 2048)  # loads it: a broken file fails here
    return confdir.resolve() / CA_CERT


def _write_store(confdir: Path) -> None:
    """The files mitmproxy's own CertStore.create_store writes, with an EC P-256 key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    from mitmproxy.certs import DEFAULT_DHPARAM, CertStore

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BASENAME), x509.NameAttribute(NameOID.ORGANIZATION_NAME, BASENAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .serial_number(x509.random_serial_number())
        .subject_name(name)
        .issuer_name(name)
        .not_valid_before(now - datetime.timedelta(days=2))  # a client whose clock lags still trusts it
        .not_valid_after(now + VALIDITY)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    no_password = serialization.NoEncryption()
    (confdir / CA_CERT).write_bytes(pem_cert)
    (confdir / f"{BASENAME}-ca-cert.cer").write_bytes(pem_cert)
    (confdir / f"{BASENAME}-ca-cert.p12").write_bytes(pkcs12.serialize_key_and_certificates(BASENAME.encode(), None, cert, None, no_password))
    (confdir / f"{BASENAME}-dhparam.pem").write_bytes(DEFAULT_DHPARAM)
    with CertStore.umask_secret():
        (confdir / f"{BASENAME}-ca.p12").write_bytes(pkcs12.serialize_key_and_certificates(BASENAME.encode(), key, cert, None, no_password))
        # Last: its presence is what says the confdir has a CA, the files above included.
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, no_password)
        (confdir / f"{BASENAME}-ca.pem").write_bytes(private + pem_cert)
