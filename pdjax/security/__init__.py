"""Security helpers for pdjax deployments (certificates for TLS / mTLS).

The TLS settings themselves live in ``pdjax.service.common.Security``; this
package only makes the PEM material (``pdjax.security.certs``), for tests and
development deployments. It needs the ``cryptography`` package, which only
this package uses, so nothing here is imported eagerly.
"""
