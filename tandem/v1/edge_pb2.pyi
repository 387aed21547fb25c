from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    EDGE: _ClassVar[Source]
    CLOUD: _ClassVar[Source]
    EDGE_FALLBACK: _ClassVar[Source]
SOURCE_UNSPECIFIED: Source
EDGE: Source
CLOUD: Source
EDGE_FALLBACK: Source

class InferRequest(_message.Message):
    __slots__ = ("task", "text", "request_id")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task: str
    text: bytes
    request_id: str
    def __init__(self, task: _Optional[str] = ..., text: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "inference_ms", "cloud_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    inference_ms: float
    cloud_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., cloud_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "task", "label", "confidence", "source", "reason", "model_version", "expert", "timings", "out_of_scope", "label_set_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_SCOPE_FIELD_NUMBER: _ClassVar[int]
    LABEL_SET_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    task: str
    label: str
    confidence: float
    source: Source
    reason: str
    model_version: str
    expert: str
    timings: Timings
    out_of_scope: bool
    label_set_version: int
    def __init__(self, request_id: _Optional[str] = ..., task: _Optional[str] = ..., label: _Optional[str] = ..., confidence: _Optional[float] = ..., source: _Optional[_Union[Source, str]] = ..., reason: _Optional[str] = ..., model_version: _Optional[str] = ..., expert: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., out_of_scope: _Optional[bool] = ..., label_set_version: _Optional[int] = ...) -> None: ...

class CorrectRequest(_message.Message):
    __slots__ = ("task", "text", "label", "request_id")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task: str
    text: bytes
    label: str
    request_id: str
    def __init__(self, task: _Optional[str] = ..., text: _Optional[bytes] = ..., label: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CorrectResponse(_message.Message):
    __slots__ = ("record_id",)
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    def __init__(self, record_id: _Optional[str] = ...) -> None: ...
