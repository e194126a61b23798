"""The CA clients trust, whichever made it: hubcache's EC P-256 one (what every other integration
test runs with) or mitmproxy's RSA one that `mitmdump -s` alone makes, which a confdir keeps."""

import hashlib
import ssl
import urllib.request

from mitmproxy.certs import CertStore

from support import proxied
from support.clients import skopeo_copy
from support.registry import REGISTRY_NAME


def test_a_confdir_with_mitmproxys_rsa_ca_keeps_it_and_serves_pulls(hubcache, multi_image, tmp_path):
    conf = tmp_path / "hubcache" / "conf"
    CertStore.from_store(conf, "mitmproxy", 2048)
    before = (conf / "mitmproxy-ca.pem").read_bytes()
    # HTTPS blob URLs: the blob server's certificate is signed by the same CA.
    proxy = hubcache(blob_urls="https", blob_listen="127.0.0.2")
    pulled = skopeo_copy(f"docker://{REGISTRY_NAME}/test/multi:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr + proxy.proc.log_text()
    assert b"BEGIN RSA PRIVATE KEY" in before and (conf / "mitmproxy-ca.pem").read_bytes() == before
    layer = multi_image.platform("linux/amd64").layers[0]
    redirect = proxied.request(proxy.port, REGISTRY_NAME, f"/v2/test/multi/blobs/{layer.digest}", ca=proxy.ca_cert, follow=False)
    assert redirect.status == 307
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    with urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)).open(
        redirect.headers["Location"], timeout=30
    ) as direct:
        assert "sha256:" + hashlib.sha256(direct.read()).hexdigest() == layer.digest
