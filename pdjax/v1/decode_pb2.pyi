from pdjax.v1 import common_pb2 as _common_pb2
from pdjax.v1 import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "prompt_tokens", "max_tokens", "transfer_id", "prompt_token_ids", "cache_salt", "wait_ms", "waited_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    WAITED_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_tokens: int
    max_tokens: int
    transfer_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    wait_ms: int
    waited_ms: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., transfer_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ..., wait_ms: _Optional[int] = ..., waited_ms: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("replica", "pages", "decode_tp", "cached_blocks")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    DECODE_TP_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    replica: int
    pages: int
    decode_tp: int
    cached_blocks: int
    def __init__(self, replica: _Optional[int] = ..., pages: _Optional[int] = ..., decode_tp: _Optional[int] = ..., cached_blocks: _Optional[int] = ...) -> None: ...

class LendLandingRequest(_message.Message):
    __slots__ = ("transfer_id", "prompt_tokens")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    prompt_tokens: int
    def __init__(self, transfer_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class LendLandingResponse(_message.Message):
    __slots__ = ("ipc_handle", "ipc_offset", "ipc_bytes", "ipc_device", "ipc_deadline_ms")
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    IPC_OFFSET_FIELD_NUMBER: _ClassVar[int]
    IPC_BYTES_FIELD_NUMBER: _ClassVar[int]
    IPC_DEVICE_FIELD_NUMBER: _ClassVar[int]
    IPC_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    ipc_handle: bytes
    ipc_offset: int
    ipc_bytes: int
    ipc_device: int
    ipc_deadline_ms: int
    def __init__(self, ipc_handle: _Optional[bytes] = ..., ipc_offset: _Optional[int] = ..., ipc_bytes: _Optional[int] = ..., ipc_device: _Optional[int] = ..., ipc_deadline_ms: _Optional[int] = ...) -> None: ...

class UnreserveRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "seed", "local_prefill", "first_token", "first_logprob", "kv", "forced_first_token", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    seed: int
    local_prefill: bool
    first_token: int
    first_logprob: float
    kv: _kv_pb2.KvHandle
    forced_first_token: int
    cache_salt: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., local_prefill: _Optional[bool] = ..., first_token: _Optional[int] = ..., first_logprob: _Optional[float] = ..., kv: _Optional[_Union[_kv_pb2.KvHandle, _Mapping]] = ..., forced_first_token: _Optional[int] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "prefill_s", "kv_transfer_s", "cached_tokens", "queue_s", "spec_draft_tokens", "spec_accepted_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    SPEC_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEC_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: _common_pb2.FinishReason
    prefill_s: float
    kv_transfer_s: float
    cached_tokens: int
    queue_s: float
    spec_draft_tokens: int
    spec_accepted_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., prefill_s: _Optional[float] = ..., kv_transfer_s: _Optional[float] = ..., cached_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ..., spec_draft_tokens: _Optional[int] = ..., spec_accepted_tokens: _Optional[int] = ...) -> None: ...

class DecodeSessionRequest(_message.Message):
    __slots__ = ("call", "start", "cancel")
    CALL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    call: int
    start: DecodeCall
    cancel: bool
    def __init__(self, call: _Optional[int] = ..., start: _Optional[_Union[DecodeCall, _Mapping]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class DecodeCall(_message.Message):
    __slots__ = ("request", "timeout_ms")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    request: DecodeRequest
    timeout_ms: int
    def __init__(self, request: _Optional[_Union[DecodeRequest, _Mapping]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class DecodeSessionResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[DecodeCallEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[DecodeCallEvent, _Mapping]]] = ...) -> None: ...

class DecodeCallEvent(_message.Message):
    __slots__ = ("call", "message", "end")
    CALL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    call: int
    message: DecodeResponse
    end: _common_pb2.CallStatus
    def __init__(self, call: _Optional[int] = ..., message: _Optional[_Union[DecodeResponse, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.CallStatus, _Mapping]] = ...) -> None: ...
