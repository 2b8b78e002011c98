from pdjax.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlockLayout(_message.Message):
    __slots__ = ("fingerprint", "shape", "dtype")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    fingerprint: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, fingerprint: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class FetchBlocksRequest(_message.Message):
    __slots__ = ("layout", "hashes", "landing")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    LANDING_FIELD_NUMBER: _ClassVar[int]
    layout: BlockLayout
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    landing: BlockLanding
    def __init__(self, layout: _Optional[_Union[BlockLayout, _Mapping]] = ..., hashes: _Optional[_Iterable[bytes]] = ..., landing: _Optional[_Union[BlockLanding, _Mapping]] = ...) -> None: ...

class BlockLanding(_message.Message):
    __slots__ = ("ipc_handle", "ipc_offset", "ipc_bytes", "ipc_deadline_ms", "process_id", "hostname")
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    IPC_OFFSET_FIELD_NUMBER: _ClassVar[int]
    IPC_BYTES_FIELD_NUMBER: _ClassVar[int]
    IPC_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ipc_handle: bytes
    ipc_offset: int
    ipc_bytes: int
    ipc_deadline_ms: int
    process_id: str
    hostname: str
    def __init__(self, ipc_handle: _Optional[bytes] = ..., ipc_offset: _Optional[int] = ..., ipc_bytes: _Optional[int] = ..., ipc_deadline_ms: _Optional[int] = ..., process_id: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class KvBlock(_message.Message):
    __slots__ = ("hash", "layout", "data", "crc32")
    HASH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    layout: BlockLayout
    data: bytes
    crc32: int
    def __init__(self, hash: _Optional[bytes] = ..., layout: _Optional[_Union[BlockLayout, _Mapping]] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class BlockPull(_message.Message):
    __slots__ = ("hashes", "layout", "transfer_address", "pull_uuid", "transport", "ipc_event_handle", "process_id", "hostname")
    HASHES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PULL_UUID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    IPC_EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    layout: BlockLayout
    transfer_address: str
    pull_uuid: int
    transport: str
    ipc_event_handle: bytes
    process_id: str
    hostname: str
    def __init__(self, hashes: _Optional[_Iterable[bytes]] = ..., layout: _Optional[_Union[BlockLayout, _Mapping]] = ..., transfer_address: _Optional[str] = ..., pull_uuid: _Optional[int] = ..., transport: _Optional[str] = ..., ipc_event_handle: _Optional[bytes] = ..., process_id: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class PutBlocksAck(_message.Message):
    __slots__ = ("stored", "present", "refused", "bytes")
    STORED_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    stored: int
    present: int
    refused: int
    bytes: int
    def __init__(self, stored: _Optional[int] = ..., present: _Optional[int] = ..., refused: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...
