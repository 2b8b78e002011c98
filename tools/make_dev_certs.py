"""Writes a development CA and certificates for a TLS / mTLS deployment.

  python tools/make_dev_certs.py --out /tmp/pdjax-certs
  python tools/make_dev_certs.py --out certs \
      --hosts=127.0.0.1,localhost,10.0.0.5,pd.internal

writes ca.pem, server.pem, server.key, client.pem, client.key. Every pdjax
service of the deployment uses server.pem/server.key (it is both their server
and, under mTLS, their client identity); external clients use
client.pem/client.key. See docs/security.md. Development only: use your own
PKI in production.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Directory to write into.",
                           required=True)
_HOSTS = flags.DEFINE_list(
    "hosts", ["127.0.0.1", "localhost", "::1"],
    "IP addresses and DNS names the service certificate is valid for: every "
    "address clients and peers dial a service by.")
_DAYS = flags.DEFINE_integer("days", 30, "Validity in days.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    from pdjax.security.certs import write_dev_certs
  except ImportError as e:
    raise SystemExit(f"error: {e}") from None
  out = write_dev_certs(_OUT.value, hosts=_HOSTS.value, days=_DAYS.value)
  print(f"wrote {out.ca}, {out.server_cert}, {out.server_key}, "
        f"{out.client_cert}, {out.client_key}")
  print("service flags: " + " ".join(out.service_flags()))


if __name__ == "__main__":
  app.run(main)
