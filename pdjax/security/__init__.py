"""Security helpers for pdjax deployments (certificates for TLS / mTLS).

The TLS settings themselves live in ``pdjax.service.common.Security``; this
package only makes the PEM material (``pdjax.security.certs``), for tests and
development deployments. It needs the ``cryptography`` package, which pdjax
does not require at run time, so nothing here is imported eagerly.
"""
