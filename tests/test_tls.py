"""TLS is verified by default: an https vCenter with an unknown certificate is refused with a clear error,
and accepted with its CA file (or with `insecure: true`, written on purpose)."""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from adapters.discovery import discover
from adapters.errors import ConnectError
from adapters.session import connect
from adapters.tags import TagClient
from testbed import topology as topo
from testbed.launcher import Vcsim

pytestmark = pytest.mark.integration


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A 2048-bit RSA certificate for 127.0.0.1 (vcsim's built-in one is too weak for OpenSSL here)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vcsim.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "vcsim.pem", directory / "vcsim.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Vcsim, Path, str]]:
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    password = secrets.token_urlsafe(16)
    sim = Vcsim.start(topo.DEFAULT_TOPOLOGY, "tls-user", password, cert=cert, key=key)
    try:
        yield sim, cert, password
    finally:
        sim.stop()


def test_the_launcher_serves_https(https: tuple[Vcsim, Path, str]) -> None:
    sim, _, _ = https
    assert sim.url.startswith("https://127.0.0.1:")


def test_an_unknown_certificate_is_refused_by_default(https: tuple[Vcsim, Path, str]) -> None:
    sim, _, password = https
    with pytest.raises(ConnectError, match="TLS verification failed") as err:
        connect(sim.url, "tls-user", password, retries=1)
    assert password not in str(err.value)


def test_its_ca_file_makes_it_trusted(https: tuple[Vcsim, Path, str]) -> None:
    sim, cert, password = https
    with connect(sim.url, "tls-user", password, ca_file=cert) as session:
        assert session.verify == str(cert)
        with TagClient(session.base_url, "tls-user", password, verify=session.verify) as tags:
            inventory = discover(session, tags=tags)
    assert len(inventory.vms) == len(topo.load(topo.DEFAULT_TOPOLOGY)["Machine"])
    assert any(vm.tags for vm in inventory.vms)


def test_insecure_skips_verification_even_with_a_ca_bundle_in_the_environment(
        https: tuple[Vcsim, Path, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sim, _, password = https
    other_ca, _ = self_signed(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_ca))  # must not override an explicit insecure
    with connect(sim.url, "tls-user", password, insecure=True) as session, \
            TagClient(session.base_url, "tls-user", password, verify=session.verify) as tags:
        assert tags.categories()
