"""What edge and cloud agree on beyond the proto: field limits, name patterns, the feedback
kinds that carry labels, the fleet's Serve application, and the student artifact's layout.

Each side validates a field once, at its own boundary, with the checks below; a failed
check raises `FieldError`, which names the field and the limit.
"""

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from tandem.v1 import fleet_pb2

# Limits. Redaction on the device keeps a text within TEXT_MAX_BYTES, so the cloud takes
# whatever an edge accepted.
TEXT_MAX_BYTES = 2048
REQUEST_ID_MAX_CHARS = 128
DEVICE_ID_MAX_CHARS = 128
# Label names: metric label values and Parquet strings, declared in task files.
LABEL_MAX_CHARS = 128
# Largest gRPC message either side accepts (the proxy's, Serve's and the edge's channel limit):
# a full feedback batch of maximal records fits, with room to spare.
MESSAGE_MAX_BYTES = 4 << 20

# Task, version and expert names become path components, partition directories, Serve
# application names and metric label values.
NAME_MAX_CHARS = 128
NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX_CHARS - 1}}}")
# Printable ASCII without spaces: record ids end up in logs and in joins across systems.
RECORD_ID = re.compile(r"[\x21-\x7e]{1,128}")

# The label a task answers "fits no intent" with, unless its task file names its own. The wire
# carries out-of-scope as this (or the task's) label, and says so in an `out_of_scope` flag.
OUT_OF_SCOPE = "out_of_scope"

# Feedback kinds whose `label` is the answer the record exists for (ground truth for training).
LABELLED_KINDS = frozenset({fleet_pb2.ESCALATION, fleet_pb2.CORRECTION})

# The Serve application answering tandem.v1.Fleet; edges send it as `application` metadata.
FLEET_APPLICATION = "fleet"
# Metadata carrying the caller's remaining deadline in whole milliseconds: Serve's gRPC proxy
# passes metadata through to the replica but not the gRPC deadline itself.
CALLER_TIMEOUT_METADATA = "tandem-timeout-ms"

# The student artifact: these files, listed with their sha256 in the signed manifest.
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
STUDENT_FILES = (MODEL_FILE, TOKENIZER_FILE, LABELS_FILE, MANIFEST_FILE)
# The student's ONNX graph: token ids and attention mask in, one logit per label out.
ONNX_INPUTS = ("input_ids", "attention_mask")
ONNX_OUTPUT = "logits"


# A refusal's message travels in gRPC trailers, which clients cap (8 KiB soft, 16 KiB hard: a
# longer one reaches the caller as RESOURCE_EXHAUSTED instead), percent-encoded (a 4-byte
# character takes 12): what a problem quotes of the input is cut to this.
PROBLEM_MAX_CHARS = 256


class FieldError(ValueError):
    """A field breaks its documented limit; the message names the field and the limit."""

    def __init__(self, field: str, problem: str) -> None:
        if len(problem) > PROBLEM_MAX_CHARS:
            problem = problem[:PROBLEM_MAX_CHARS] + "..."
        super().__init__(f"{field}: {problem}")
        self.field = field


def check_text(field: str, text: str) -> str:
    """`text` if it is not blank and within TEXT_MAX_BYTES of UTF-8."""
    size = len(text.encode())
    if size > TEXT_MAX_BYTES:
        raise FieldError(field, f"{size} bytes exceeds the limit of {TEXT_MAX_BYTES} bytes")
    if not text.strip():
        raise FieldError(field, "must not be empty or blank")
    return text


def decode_text(field: str, data: bytes) -> str:
    """UTF-8 `data` as checked text; the size is checked before decoding."""
    if len(data) > TEXT_MAX_BYTES:
        raise FieldError(field, f"{len(data)} bytes exceeds the limit of {TEXT_MAX_BYTES} bytes")
    try:
        return check_text(field, data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FieldError(field, f"invalid UTF-8 at byte {exc.start}") from exc


def check_request_id(field: str, request_id: str) -> str:
    """`request_id` if it has at most REQUEST_ID_MAX_CHARS printable ASCII characters (may be empty)."""
    if len(request_id) > REQUEST_ID_MAX_CHARS or not (request_id.isascii() and request_id.isprintable()):
        raise FieldError(field, f"at most {REQUEST_ID_MAX_CHARS} printable ASCII characters")
    return request_id


def check_device_id(field: str, device_id: str) -> str:
    """`device_id` if it has at most DEVICE_ID_MAX_CHARS characters (may be empty)."""
    if len(device_id) > DEVICE_ID_MAX_CHARS:
        raise FieldError(field, f"{len(device_id)} characters exceed the limit of {DEVICE_ID_MAX_CHARS}")
    return device_id


def check_name(field: str, name: str) -> str:
    """`name` if it matches NAME. A long name is not echoed back: the message travels in gRPC
    trailers, which clients cap at a few KiB."""
    if len(name) > NAME_MAX_CHARS:
        raise FieldError(field, f"{len(name)} characters exceed the limit of {NAME_MAX_CHARS}")
    if not NAME.fullmatch(name):
        raise FieldError(field, f"invalid name {name!r}: 1 to 128 letters, digits, '.', '_', '-', "
                                "starting with a letter or digit")
    return name


# Anchored: pydantic searches a pattern anywhere in the string ("../x" contains a NAME).
SafeName = Annotated[str, StringConstraints(pattern=rf"^{NAME.pattern}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# A signing key's id: the first 16 hex digits of the sha256 of its raw Ed25519 public key.
KEY_ID = re.compile(r"[0-9a-f]{16}")
KeyId = Annotated[str, StringConstraints(pattern=rf"^{KEY_ID.pattern}$")]


class ArtifactFile(BaseModel):
    sha256: Sha256
    size: int = Field(ge=0)


class OutOfScope(BaseModel):
    """The out-of-scope boundary of a classifier (`tandem.open_set`), fitted on held-out data
    with known intents only: a text whose temperature-scaled logits all fall below `logit`
    fits none of the model's intents."""

    model_config = ConfigDict(frozen=True)

    label: str = Field(min_length=1, max_length=LABEL_MAX_CHARS, description="The label it answers with.")
    logit: float = Field(description="The out-of-scope class's logit, beside the temperature-scaled ones.")
    known_rejection: float = Field(
        ge=0, le=1, description="Share of the held-out texts of known intents it answers out of scope (fitted to)."
    )


class RiskThreshold(BaseModel):
    """One certified operating point of the risk-controlled policy (`OperatingPoint.risk`)."""

    model_config = ConfigDict(frozen=True)

    epsilon: float = Field(gt=0, lt=1, description="The bound on the error rate among the answers kept locally.")
    threshold: float | None = Field(
        None, ge=0, le=1, description="Keep answers at or above this confidence; None: no threshold on the "
        "calibration split certifies `epsilon`, so every answer escalates.",
    )


class OperatingPoint(BaseModel):
    """A student's escalation thresholds, fitted by the trainer on held-out data (manifest
    `operating_point`). An edge whose policy pins no threshold adopts `threshold`; one in risk
    mode adopts the entry of `risk` for its epsilon."""

    model_config = ConfigDict(frozen=True)

    threshold: float = Field(ge=0, le=1, description="Escalate below this confidence: the fitted threshold.")
    objective: Literal["escalation_rate", "cascade_accuracy"] = Field(
        description="What `threshold` was fitted for: a target escalation rate, or a target cascade accuracy."
    )
    target: float = Field(ge=0, le=1, description="The objective's target on the held-out split (absolute).")
    fitted: dict[str, float] = Field(
        default_factory=dict, description="What the threshold achieved on the held-out split (escalation_rate, "
        "cascade_accuracy, expert_accuracy, examples).",
    )
    risk_delta: float = Field(
        0.05, gt=0, lt=1, description="Each `risk` threshold keeps the error among local answers at most its "
        "epsilon with probability at least 1 - risk_delta (Learn-then-Test on the calibration split).",
    )
    risk_examples: int = Field(0, ge=0, description="Size of the calibration split the risk thresholds come from.")
    risk: list[RiskThreshold] = Field(default_factory=list, description="Certified thresholds, by epsilon ascending.")


class Manifest(BaseModel):
    """manifest.json of a model artifact: what the trainer writes, signs and the edge reads.
    Training adds its lineage (fit config, metrics, gate, feedback counts) as extra fields."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Literal["student", "teacher"]
    task: SafeName
    version: SafeName
    created_at: datetime
    payload: SafeName = Field(description="The model file whose sha256 is `sha256`.")
    sha256: Sha256
    temperature: float | None = Field(None, gt=0, description="Students: divides the logits (calibration).")
    max_length: int | None = Field(None, ge=1, description="Students: tokens kept per text.")
    out_of_scope: OutOfScope | None = Field(
        None, description="The out-of-scope boundary; None: every answer is one of the model's labels."
    )
    label_set_version: int = Field(1, ge=1, description="The version of the task's label set the model was trained on.")
    operating_point: OperatingPoint | None = Field(
        None, description="Students: the fitted escalation thresholds; None (older artifacts): the edge's own."
    )
    files: dict[SafeName, ArtifactFile] = Field(
        default_factory=dict, description="Every file of a signed artifact but the manifest and its signature."
    )
    sequence: int = Field(
        0, ge=0, description="The version's place in its task's registry (1, 2, ...; each publish is above every "
        "earlier one). 0: built outside the registry (`tandem train student`, a teacher): any published version "
        "supersedes it.",
    )
    key_id: KeyId | None = Field(None, description="The key that signed the artifact (its signature names it too).")

    @field_validator("files")
    @classmethod
    def _not_the_manifest(cls, files: dict[str, ArtifactFile]) -> dict[str, ArtifactFile]:
        if {MANIFEST_FILE, SIGNATURE_FILE} & files.keys():
            raise ValueError(f"files must not list {MANIFEST_FILE} or {SIGNATURE_FILE}")
        return files

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        return cls.model_validate_json((directory / MANIFEST_FILE).read_bytes())

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()


class Promotion(BaseModel):
    """promoted.json: the registry's signed statement that edges should run `version` of `task`."""

    model_config = ConfigDict(frozen=True)

    task: SafeName
    version: SafeName
    sequence: int = Field(ge=1, description="The promoted version's manifest sequence.")
    manifest_sha256: Sha256 = Field(description="sha256 of the promoted version's exact manifest.json bytes.")
    previous: SafeName | None = Field(None, description="The version promoted before, if another one.")
    rollback_of: SafeName | None = Field(
        None, description="Set when an operator rolls back: the promoted version this one replaces, although "
        "it is older. Edges take an older version only as a signed rollback of the one they serve.",
    )
    promoted_at: datetime
    key_id: KeyId

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()
