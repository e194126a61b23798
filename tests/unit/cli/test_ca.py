"""The CA made on first start: mitmproxy's files, an EC P-256 key, an existing CA kept."""

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mitmproxy.certs import CertStore

from hubcache.cli.ca import make_ca
from hubcache.cli.proxy import key_size

FILES = ("mitmproxy-ca.pem", "mitmproxy-ca.p12", "mitmproxy-ca-cert.pem", "mitmproxy-ca-cert.cer", "mitmproxy-ca-cert.p12", "mitmproxy-dhparam.pem")


def test_a_new_confdir_gets_an_ec_ca_that_mitmproxy_loads_and_signs_with(tmp_path):
    cert_path = make_ca(tmp_path / "certs")
    assert cert_path == (tmp_path / "certs" / "mitmproxy-ca-cert.pem").resolve()
    assert sorted(p.name for p in cert_path.parent.iterdir()) == sorted(FILES)
    for secret in ("mitmproxy-ca.pem", "mitmproxy-ca.p12"):
        assert stat.S_IMODE((cert_path.parent / secret).stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    store = CertStore.from_store(cert_path.parent, "mitmproxy", 2048)
    leaf = store.get_cert("registry-1.docker.io", []).cert.to_cryptography()
    leaf.verify_directly_issued_by(ca)  # raises unless the CA's key signed it


def test_a_confdir_that_has_a_ca_keeps_it(tmp_path):
    CertStore.from_store(tmp_path, "mitmproxy", 2048)  # mitmproxy's own, as `mitmdump` alone makes it
    before = (tmp_path / "mitmproxy-ca.pem").read_bytes()
    make_ca(tmp_path)
    assert (tmp_path / "mitmproxy-ca.pem").read_bytes() == before
    ec_dir = tmp_path / "ec"
    first = make_ca(ec_dir).read_bytes()
    assert make_ca(ec_dir).read_bytes() == first


def test_a_key_size_the_operator_set_asks_mitmproxy_for_its_rsa_ca(tmp_path):
    ca = x509.load_pem_x509_certificate(make_ca(tmp_path, 3072).read_bytes())
    assert isinstance(ca.public_key(), rsa.RSAPublicKey) and ca.public_key().key_size == 3072


@pytest.mark.parametrize(
    "settings, expected",
    [([], None), (["cache_dir=x"], None), (["key_size=4096"], 4096), (["key_size=1024", "key_size=3072"], 3072), (["key_size=²"], None)],
)
def test_the_key_size_is_read_from_the_settings(settings, expected):
    assert key_size(settings) == expected
