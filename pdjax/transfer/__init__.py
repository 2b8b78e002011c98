"""KV transports between the prefill and decode pools (``--kv_transport``).

* ``local``: both pools in one process; ``device_put`` between meshes.
* ``device``: ``jax.experimental.transfer`` between processes/hosts.
* ``grpc``: host-staged chunks over a gRPC stream; works anywhere.

See ``pdjax.transfer.base`` for the hand-off lifecycle.
"""

TRANSPORTS = ("local", "device", "grpc")


def __getattr__(name: str):
  # The transports' types load JAX; importing this package (for an id, from
  # the router) does not.
  if name in __all__:
    from pdjax.transfer import base
    return getattr(base, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["KvReceiver", "KvSender", "LeaseTable", "TransferDenied",
           "TransferError", "TransferTimeout", "new_transfer_id",
           "TRANSPORTS"]
