from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class LabelScore(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class EdgePrediction(_message.Message):
    __slots__ = ("label", "confidence", "model_version")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    label: str
    confidence: float
    model_version: str
    def __init__(self, label: _Optional[str] = ..., confidence: _Optional[float] = ..., model_version: _Optional[str] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("record", "mac", "key_id")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    record: bytes
    mac: bytes
    key_id: str
    def __init__(self, record: _Optional[bytes] = ..., mac: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...
