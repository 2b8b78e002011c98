from pdjax.v1 import common_pb2 as _common_pb2
from pdjax.v1 import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "seed", "destination", "cache_salt", "kv_sources", "destination_pending")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    KV_SOURCES_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_PENDING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    seed: int
    destination: _kv_pb2.KvDestination
    cache_salt: str
    kv_sources: _containers.RepeatedCompositeFieldContainer[KvSource]
    destination_pending: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., destination: _Optional[_Union[_kv_pb2.KvDestination, _Mapping]] = ..., cache_salt: _Optional[str] = ..., kv_sources: _Optional[_Iterable[_Union[KvSource, _Mapping]]] = ..., destination_pending: _Optional[bool] = ...) -> None: ...

class CompleteDestinationRequest(_message.Message):
    __slots__ = ("destination",)
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    destination: _kv_pb2.KvDestination
    def __init__(self, destination: _Optional[_Union[_kv_pb2.KvDestination, _Mapping]] = ...) -> None: ...

class KvSource(_message.Message):
    __slots__ = ("address", "blocks")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    address: str
    blocks: int
    def __init__(self, address: _Optional[str] = ..., blocks: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token", "first_logprob", "kv", "prefill_s", "transfer_s", "cached_tokens", "queue_s")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    first_logprob: float
    kv: _kv_pb2.KvHandle
    prefill_s: float
    transfer_s: float
    cached_tokens: int
    queue_s: float
    def __init__(self, first_token: _Optional[int] = ..., first_logprob: _Optional[float] = ..., kv: _Optional[_Union[_kv_pb2.KvHandle, _Mapping]] = ..., prefill_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., cached_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ...) -> None: ...

class ReleaseKvRequest(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class PrefillSessionRequest(_message.Message):
    __slots__ = ("call", "start", "cancel")
    CALL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    call: int
    start: PrefillCall
    cancel: bool
    def __init__(self, call: _Optional[int] = ..., start: _Optional[_Union[PrefillCall, _Mapping]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class PrefillCall(_message.Message):
    __slots__ = ("request", "timeout_ms")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    request: PrefillRequest
    timeout_ms: int
    def __init__(self, request: _Optional[_Union[PrefillRequest, _Mapping]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class PrefillSessionResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[PrefillCallEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[PrefillCallEvent, _Mapping]]] = ...) -> None: ...

class PrefillCallEvent(_message.Message):
    __slots__ = ("call", "message", "end")
    CALL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    call: int
    message: PrefillResponse
    end: _common_pb2.CallStatus
    def __init__(self, call: _Optional[int] = ..., message: _Optional[_Union[PrefillResponse, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.CallStatus, _Mapping]] = ...) -> None: ...
