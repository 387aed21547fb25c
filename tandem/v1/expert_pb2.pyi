from tandem.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EscalateRequest(_message.Message):
    __slots__ = ("request_id", "task", "text", "edge", "device_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    task: str
    text: str
    edge: _common_pb2.EdgePrediction
    device_id: str
    def __init__(self, request_id: _Optional[str] = ..., task: _Optional[str] = ..., text: _Optional[str] = ..., edge: _Optional[_Union[_common_pb2.EdgePrediction, _Mapping]] = ..., device_id: _Optional[str] = ...) -> None: ...

class EscalateResponse(_message.Message):
    __slots__ = ("request_id", "label", "confidence", "distribution", "expert", "expert_ms", "receipt", "out_of_scope", "label_set_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_SCOPE_FIELD_NUMBER: _ClassVar[int]
    LABEL_SET_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    label: str
    confidence: float
    distribution: _containers.RepeatedCompositeFieldContainer[_common_pb2.LabelScore]
    expert: str
    expert_ms: float
    receipt: _common_pb2.Receipt
    out_of_scope: bool
    label_set_version: int
    def __init__(self, request_id: _Optional[str] = ..., label: _Optional[str] = ..., confidence: _Optional[float] = ..., distribution: _Optional[_Iterable[_Union[_common_pb2.LabelScore, _Mapping]]] = ..., expert: _Optional[str] = ..., expert_ms: _Optional[float] = ..., receipt: _Optional[_Union[_common_pb2.Receipt, _Mapping]] = ..., out_of_scope: _Optional[bool] = ..., label_set_version: _Optional[int] = ...) -> None: ...
