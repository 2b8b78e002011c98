"""KV transports between the prefill and decode pools (``--kv_transport``).

* ``local``: both pools in one process; ``device_put`` between meshes.
* ``device``: ``jax.experimental.transfer`` between processes/hosts.
* ``grpc``: host-staged chunks over a gRPC stream; works anywhere.

See ``pdjax.transfer.base`` for the hand-off lifecycle.
"""

from pdjax.transfer.base import (KvReceiver, KvSender, LeaseTable,
                                 TransferDenied, TransferError,
                                 TransferTimeout, new_transfer_id)

TRANSPORTS = ("local", "device", "grpc")

__all__ = ["KvReceiver", "KvSender", "LeaseTable", "TransferDenied",
           "TransferError", "TransferTimeout", "new_transfer_id",
           "TRANSPORTS"]
