from tandem.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_KIND_UNSPECIFIED: _ClassVar[FeedbackKind]
    ESCALATION: _ClassVar[FeedbackKind]
    CORRECTION: _ClassVar[FeedbackKind]
    FALLBACK: _ClassVar[FeedbackKind]
    AUDIT: _ClassVar[FeedbackKind]
FEEDBACK_KIND_UNSPECIFIED: FeedbackKind
ESCALATION: FeedbackKind
CORRECTION: FeedbackKind
FALLBACK: FeedbackKind
AUDIT: FeedbackKind

class FeedbackRecord(_message.Message):
    __slots__ = ("record_id", "request_id", "task", "kind", "text", "edge", "label", "distribution", "expert", "device_id", "created_unix_ms", "receipt", "label_set_version")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    LABEL_SET_VERSION_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    request_id: str
    task: str
    kind: FeedbackKind
    text: str
    edge: _common_pb2.EdgePrediction
    label: str
    distribution: _containers.RepeatedCompositeFieldContainer[_common_pb2.LabelScore]
    expert: str
    device_id: str
    created_unix_ms: int
    receipt: _common_pb2.Receipt
    label_set_version: int
    def __init__(self, record_id: _Optional[str] = ..., request_id: _Optional[str] = ..., task: _Optional[str] = ..., kind: _Optional[_Union[FeedbackKind, str]] = ..., text: _Optional[str] = ..., edge: _Optional[_Union[_common_pb2.EdgePrediction, _Mapping]] = ..., label: _Optional[str] = ..., distribution: _Optional[_Iterable[_Union[_common_pb2.LabelScore, _Mapping]]] = ..., expert: _Optional[str] = ..., device_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., receipt: _Optional[_Union[_common_pb2.Receipt, _Mapping]] = ..., label_set_version: _Optional[int] = ...) -> None: ...

class ReportFeedbackRequest(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[FeedbackRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[FeedbackRecord, _Mapping]]] = ...) -> None: ...

class ReportFeedbackResponse(_message.Message):
    __slots__ = ("stored", "duplicates")
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    stored: int
    duplicates: int
    def __init__(self, stored: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: str
    def __init__(self, task: _Optional[str] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ModelManifest(_message.Message):
    __slots__ = ("task", "version", "manifest_json", "signature", "files", "promotion_json", "promotion_signature")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_JSON_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: str
    manifest_json: bytes
    signature: bytes
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    promotion_json: bytes
    promotion_signature: bytes
    def __init__(self, task: _Optional[str] = ..., version: _Optional[str] = ..., manifest_json: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., promotion_json: _Optional[bytes] = ..., promotion_signature: _Optional[bytes] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("task", "version")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: str
    def __init__(self, task: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("file", "offset", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: str
    offset: int
    data: bytes
    def __init__(self, file: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetRoutesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Routes(_message.Message):
    __slots__ = ("applications",)
    class ApplicationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    APPLICATIONS_FIELD_NUMBER: _ClassVar[int]
    applications: _containers.ScalarMap[str, str]
    def __init__(self, applications: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AckRolloutRequest(_message.Message):
    __slots__ = ("task", "version")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: str
    def __init__(self, task: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class AckRolloutResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
