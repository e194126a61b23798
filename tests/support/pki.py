"""A throwaway certificate authority for tests (cryptography only)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["SYSTEM_BUNDLE", "TestCA", "ca_bundle"]

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _validity() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(days=1), now + dt.timedelta(days=3650)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


class TestCA:
    """An EC P-256 CA kept in `directory` (ca.crt, ca.key).

    If `directory` already holds ca.crt and ca.key they are reused, so a
    directory can be shared by several fixtures. Certificates are valid from
    one day ago to ten years ahead.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, directory: Path | str, common_name: str = "hubcache test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cert_path = self.directory / "ca.crt"
        self.key_path = self.directory / "ca.key"
        if self.cert_path.exists() and self.key_path.exists():
            self._key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
            self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        not_before, not_after = _validity()
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        _write_key(self._key, self.key_path)
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    @property
    def cert_pem(self) -> bytes:
        return self.cert_path.read_bytes()

    def issue(
        self,
        name: str,
        dns_names: list[str],
        ip_addresses: list[str] | None = None,
    ) -> tuple[Path, Path]:
        """Issue a TLS server certificate; return (cert_path, key_path).

        The files are `<name>.crt` / `<name>.key` in the CA directory (the
        name is sanitised for the file system); the certificate file holds the
        leaf followed by the CA cert. SANs are `dns_names` plus `ip_addresses`
        (default ["127.0.0.1"]); the EKU is serverAuth; the subject CN is the
        first DNS name (or `name`).
        """
        if ip_addresses is None:
            ip_addresses = ["127.0.0.1"]
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        cert_path = self.directory / f"{stem}.crt"
        key_path = self.directory / f"{stem}.key"
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        not_before, not_after = _validity()
        cn = dns_names[0] if dns_names else name
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        _write_key(key, key_path)
        cert_path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + self._cert.public_bytes(serialization.Encoding.PEM)
        )
        return cert_path, key_path

    def cert_dir(self, directory: Path | str) -> Path:
        """Create `directory` holding only ca.crt (for skopeo --cert-dir etc.)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "ca.crt").write_bytes(self.cert_pem)
        return d


def ca_bundle(extra_pems: list[Path], out: Path) -> Path:
    """Write the system CA bundle (if present) plus `extra_pems` to `out`.

    Suitable for SSL_CERT_FILE of Go clients (dockerd, skopeo): Go then
    trusts exactly this file (with SSL_CERT_DIR pointing at an empty dir).
    """
    parts: list[bytes] = []
    if SYSTEM_BUNDLE.exists():
        parts.append(SYSTEM_BUNDLE.read_bytes())
    for p in extra_pems:
        parts.append(Path(p).read_bytes())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"".join(p if p.endswith(b"\n") else p + b"\n" for p in parts))
    return out
