from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvDestination(_message.Message):
    __slots__ = ("transport", "transfer_id", "decode_address", "replica", "decode_process_id", "decode_tp", "ipc_handle", "ipc_offset", "ipc_bytes", "decode_hostname", "ipc_deadline_ms", "skip_pages", "decode_pp")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    DECODE_PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_TP_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    IPC_OFFSET_FIELD_NUMBER: _ClassVar[int]
    IPC_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODE_HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    IPC_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    SKIP_PAGES_FIELD_NUMBER: _ClassVar[int]
    DECODE_PP_FIELD_NUMBER: _ClassVar[int]
    transport: str
    transfer_id: str
    decode_address: str
    replica: int
    decode_process_id: str
    decode_tp: int
    ipc_handle: bytes
    ipc_offset: int
    ipc_bytes: int
    decode_hostname: str
    ipc_deadline_ms: int
    skip_pages: int
    decode_pp: int
    def __init__(self, transport: _Optional[str] = ..., transfer_id: _Optional[str] = ..., decode_address: _Optional[str] = ..., replica: _Optional[int] = ..., decode_process_id: _Optional[str] = ..., decode_tp: _Optional[int] = ..., ipc_handle: _Optional[bytes] = ..., ipc_offset: _Optional[int] = ..., ipc_bytes: _Optional[int] = ..., decode_hostname: _Optional[str] = ..., ipc_deadline_ms: _Optional[int] = ..., skip_pages: _Optional[int] = ..., decode_pp: _Optional[int] = ...) -> None: ...

class KvHandle(_message.Message):
    __slots__ = ("transport", "transfer_id", "num_tokens", "first_page", "shape", "dtype", "transfer_address", "pull_uuid", "shards", "prefill_address", "ipc_event_handle", "layer_shards")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PULL_UUID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IPC_EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    LAYER_SHARDS_FIELD_NUMBER: _ClassVar[int]
    transport: str
    transfer_id: str
    num_tokens: int
    first_page: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    transfer_address: str
    pull_uuid: int
    shards: int
    prefill_address: str
    ipc_event_handle: bytes
    layer_shards: int
    def __init__(self, transport: _Optional[str] = ..., transfer_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., first_page: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., transfer_address: _Optional[str] = ..., pull_uuid: _Optional[int] = ..., shards: _Optional[int] = ..., prefill_address: _Optional[str] = ..., ipc_event_handle: _Optional[bytes] = ..., layer_shards: _Optional[int] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("handle", "layer", "kv", "page_start", "num_pages", "head_start", "num_heads", "data", "crc32", "last")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    PAGE_START_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    handle: KvHandle
    layer: int
    kv: int
    page_start: int
    num_pages: int
    head_start: int
    num_heads: int
    data: bytes
    crc32: int
    last: bool
    def __init__(self, handle: _Optional[_Union[KvHandle, _Mapping]] = ..., layer: _Optional[int] = ..., kv: _Optional[int] = ..., page_start: _Optional[int] = ..., num_pages: _Optional[int] = ..., head_start: _Optional[int] = ..., num_heads: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ..., last: _Optional[bool] = ...) -> None: ...

class KvAck(_message.Message):
    __slots__ = ("bytes", "chunks")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    chunks: int
    def __init__(self, bytes: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...
