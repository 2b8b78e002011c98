"""A throwaway certificate authority for TLS / mutual TLS deployments.

pdjax's services all share one CA: every process of a deployment serves a
certificate the CA signed and, under mutual TLS, presents that same
certificate when it dials another service (router -> workers, prefill ->
decode KV pushes, decode -> prefill ``ReleaseKv``). So the *service*
certificate carries both the serverAuth and the clientAuth extended key
usages, and names every address peers dial it by: gRPC checks the server
certificate against the target host, and a target like ``127.0.0.1:50051``
is matched against an IP subjectAltName, not a DNS one.

External clients get a separate clientAuth-only certificate from the same CA.

This is for tests and development (keys are written unencrypted, validity is
short); production deployments should use their own PKI (cert-manager, a
corporate CA, ...). ``tools/make_dev_certs.py`` is the command-line front end.

Needs the ``cryptography`` package (a dependency of pdjax).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from pathlib import Path
from typing import Iterable

try:
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as e:   # an environment installed without it
  raise ImportError(
      "pdjax.security.certs needs the 'cryptography' package, a dependency "
      "of pdjax that this environment lacks: pip install 'cryptography>=42' "
      "(or reinstall pdjax: pip install -e .)") from e

# Names a single-machine deployment is dialed by (launch.local binds
# 127.0.0.1 and advertises host:port).
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_DAYS = 30


@dataclasses.dataclass(frozen=True)
class Issued:
  """A certificate and its private key (cryptography objects)."""
  cert: x509.Certificate
  key: ec.EllipticCurvePrivateKey

  @property
  def cert_pem(self) -> bytes:
    return self.cert.public_bytes(serialization.Encoding.PEM)

  @property
  def key_pem(self) -> bytes:
    return self.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _new_key() -> ec.EllipticCurvePrivateKey:
  # P-256: fast to generate (tests make several CAs) and every TLS stack
  # gRPC links (BoringSSL, OpenSSL) accepts it.
  return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
  return x509.Name([
      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pdjax"),
      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, days: int
              ) -> x509.CertificateBuilder:
  now = datetime.datetime.now(datetime.timezone.utc)
  # Backdated a little: clocks of the machines of a deployment differ.
  return builder.not_valid_before(now - datetime.timedelta(minutes=5)
                                  ).not_valid_after(
                                      now + datetime.timedelta(days=days))


def make_ca(common_name: str = "pdjax development CA", *,
            days: int = DEFAULT_DAYS) -> Issued:
  """A self-signed CA that may sign leaf certificates only."""
  key = _new_key()
  name = _name(common_name)
  builder = x509.CertificateBuilder().subject_name(name).issuer_name(
      name).public_key(key.public_key()).serial_number(
          x509.random_serial_number())
  builder = _validity(builder, days)
  builder = builder.add_extension(
      x509.BasicConstraints(ca=True, path_length=0), critical=True
  ).add_extension(
      x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False), critical=True
  ).add_extension(
      x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
      critical=False)
  return Issued(builder.sign(key, hashes.SHA256()), key)


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
  names: list[x509.GeneralName] = []
  for h in hosts:
    try:
      names.append(x509.IPAddress(ipaddress.ip_address(h)))
    except ValueError:
      names.append(x509.DNSName(h))
  return x509.SubjectAlternativeName(names)


def make_leaf(ca: Issued, common_name: str, *,
              hosts: Iterable[str] = DEFAULT_HOSTS, server: bool = True,
              client: bool = True, days: int = DEFAULT_DAYS) -> Issued:
  """A certificate signed by ``ca``.

  Args:
    ca: the issuing CA (from ``make_ca``).
    common_name: the subject CN (informational; gRPC matches SANs).
    hosts: IP addresses and DNS names the certificate is valid for (each
      becomes an IP or DNS subjectAltName). Needed for server use only.
    server: allow TLS server use (serverAuth).
    client: allow TLS client use (clientAuth), i.e. mutual TLS.
    days: validity.
  """
  if not (server or client):
    raise ValueError("a leaf certificate needs server or client use")
  key = _new_key()
  builder = x509.CertificateBuilder().subject_name(
      _name(common_name)).issuer_name(ca.cert.subject).public_key(
          key.public_key()).serial_number(x509.random_serial_number())
  builder = _validity(builder, days)
  usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
      [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
  builder = builder.add_extension(
      x509.BasicConstraints(ca=False, path_length=None), critical=True
  ).add_extension(
      x509.KeyUsage(digital_signature=True, key_encipherment=False,
                    content_commitment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False), critical=True
  ).add_extension(x509.ExtendedKeyUsage(usages), critical=False
  ).add_extension(
      x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
      critical=False)
  hosts = list(hosts)
  if hosts:
    builder = builder.add_extension(_san(hosts), critical=False)
  return Issued(builder.sign(ca.key, hashes.SHA256()), key)


@dataclasses.dataclass(frozen=True)
class DevCerts:
  """Paths of the files ``write_dev_certs`` wrote.

  ``server_*``: the identity every pdjax service of the deployment uses
  (``--tls_cert``/``--tls_key``; it is also their client identity under
  ``--tls_mtls``). ``client_*``: for external clients (``TlsConfig``).
  """
  dir: Path
  ca: Path
  server_cert: Path
  server_key: Path
  client_cert: Path
  client_key: Path

  def service_flags(self, *, mtls: bool = True) -> list[str]:
    """The launcher flags that turn TLS (and mTLS) on for a service."""
    flags = [f"--tls_cert={self.server_cert}", f"--tls_key={self.server_key}",
             f"--tls_ca={self.ca}"]
    if mtls:
      flags.append("--tls_mtls")
    return flags


def _write(path: Path, data: bytes, private: bool = False) -> None:
  tmp = path.with_name(path.name + ".tmp")
  flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
  fd = os.open(tmp, flags, 0o600 if private else 0o644)
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_dev_certs(directory: str | os.PathLike, *,
                    hosts: Iterable[str] = DEFAULT_HOSTS,
                    days: int = DEFAULT_DAYS,
                    ca_name: str = "pdjax development CA") -> DevCerts:
  """Writes ca.pem, server.pem, server.key, client.pem, client.key.

  Keys are written 0600. The CA's own key is not written: nothing more can
  be signed by it later, which is what a throwaway CA should allow.
  """
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  ca = make_ca(ca_name, days=days)
  service = make_leaf(ca, "pdjax service", hosts=hosts, server=True,
                      client=True, days=days)
  client = make_leaf(ca, "pdjax client", hosts=(), server=False, client=True,
                     days=days)
  out = DevCerts(d, d / "ca.pem", d / "server.pem", d / "server.key",
                 d / "client.pem", d / "client.key")
  _write(out.ca, ca.cert_pem)
  _write(out.server_cert, service.cert_pem)
  _write(out.server_key, service.key_pem, private=True)
  _write(out.client_cert, client.cert_pem)
  _write(out.client_key, client.key_pem, private=True)
  return out


__all__ = ["Issued", "DevCerts", "make_ca", "make_leaf", "write_dev_certs",
           "DEFAULT_HOSTS"]
