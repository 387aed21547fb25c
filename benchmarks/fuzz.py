"""Fuzzing one gRPC method over a real channel.

`fuzz_rpc` sends `n` inputs to a method and sorts the answers: structured messages whose every
field is random (empty, huge, unicode, negative, NaN, unknown enum values, long repeated
fields; a field's `known` values often, so that inputs get past the first check), and raw
bodies that are not valid messages (random bytes, and valid ones truncated, bit-flipped, or with
a bad tag, length, varint or UTF-8 appended). Hypothesis draws them, seeded: the same seed
gives the same inputs. What counts against the server:
- a crash: it stops answering (a liveness call after a call that got no answer gets none either);
- INTERNAL or UNKNOWN: a bug escaped the server's error boundary;
- an unnamed rejection: a refusal for bad input (FIELD_CODES) whose details do not start with
  the field, `field: problem` (a field path like `records[3].label`, or the request's type name
  for a body that does not parse).
"""

import asyncio
import dataclasses
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

FIELD_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED})
BUG_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
# A call that got no answer (the fuzzer cancels none); a liveness call then tells a crash from a
# slow answer.
SILENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})

SPECIAL_TEXT = ("", " ", "\t\n", "\x00", "\u200b", "e\u0301", "\U0001f600" * 3, "\u202eevil", "../../etc/passwd",
                "%s%n", "' OR 1=1 --", "\ufeff", "\uffff", "a" * 129, "Ä" * 1025)
SPECIAL_FLOATS = (0.0, -0.0, 1.0, -1.0, 1 + 1e-3, 1e-45, 3.4e38, float("nan"), float("inf"), float("-inf"))
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Repeated fields and huge strings are built by repetition (cheap to draw) up to about this size,
# far beyond every field limit and well under the 4 MiB message limit.
REPEAT_MAX_BYTES = 256 << 10
MAX_DEPTH = 3
TRAILERS_TOO_LARGE = "received metadata size exceeds"
FIELD_PREFIX = re.compile(r"^\s*([A-Za-z_]\w*)(?:\[[^\]]*\]|\.\w+)*\s*:")


@dataclasses.dataclass
class FuzzResult:
    """What `n` inputs to one method got back; `samples` holds the first few bad outcomes of each kind."""

    method: str
    inputs: int = 0
    crashes: int = 0
    internal_or_unknown: int = 0
    unnamed_rejections: int = 0
    codes: Counter[str] = dataclasses.field(default_factory=Counter)
    samples: list[dict[str, str]] = dataclasses.field(default_factory=list)
    generate_s: float = 0.0
    send_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "codes": dict(self.codes)}

    def _sample(self, kind: str, body: bytes, code: grpc.StatusCode, details: str, keep: int = 5) -> None:
        if sum(sample["kind"] == kind for sample in self.samples) < keep:
            self.samples.append({"kind": kind, "code": code.name, "details": details[:300], "input": body[:64].hex()})


async def fuzz_rpc(
    channel: grpc.aio.Channel,
    method: str,
    request_class: type[Message],
    n: int,
    metadata: Sequence[tuple[str, str]] = (),
    known: Mapping[str, Sequence[Any]] | None = None,
    corrupt_share: float = 0.2,
    concurrency: int = 16,
    timeout_s: float = 10.0,
    seed: int = 0,
    valid: Mapping[str, Any] | None = None,
) -> FuzzResult:
    """Sends `n` inputs to `method` ("/package.Service/Method", any streaming kind) over
    `channel` with `metadata`, `concurrency` at a time. `known`: field name (at any depth) →
    values that the field is often given. `valid`: a valid request's fields, which some inputs
    keep but one, so that they reach the checks behind the first. Stops at the first crash."""
    result = FuzzResult(method)
    started = time.perf_counter()
    bodies = await asyncio.to_thread(generate, request_class, n, known or {}, corrupt_share, seed, valid)
    result.generate_s = time.perf_counter() - started
    call = _caller(channel, method, metadata, timeout_s)
    roots = {field.name for field in request_class.DESCRIPTOR.fields} | {request_class.DESCRIPTOR.name}
    alive = request_class().SerializeToString()
    started = time.perf_counter()
    for start in range(0, len(bodies), concurrency):
        chunk = bodies[start : start + concurrency]
        outcomes = await asyncio.gather(*(call(body) for body in chunk))
        result.inputs += len(chunk)
        for body, (code, details) in zip(chunk, outcomes):
            _judge(result, roots, body, code, details)
        if any(code in SILENT_CODES for code, _ in outcomes) and (await call(alive))[0] in SILENT_CODES:
            result.crashes += 1
            for body in chunk:  # the server died on one of these
                result._sample("crash_suspect", body, grpc.StatusCode.UNAVAILABLE, "no answer to a liveness call after it")
            break
    else:
        if (await call(alive))[0] in SILENT_CODES:
            result.crashes += 1
    result.send_s = time.perf_counter() - started
    return result


def _judge(result: FuzzResult, roots: set[str], body: bytes, code: grpc.StatusCode, details: str) -> None:
    result.codes[code.name] += 1
    if code in BUG_CODES:
        result.internal_or_unknown += 1
        result._sample("internal_or_unknown", body, code, details)
    elif (code in FIELD_CODES and not names_field(details, roots)) or TRAILERS_TOO_LARGE in details:
        # The second: a refusal whose message was too long for the client's trailer limit,
        # which gRPC turns into RESOURCE_EXHAUSTED: the caller never learns the field.
        result.unnamed_rejections += 1
        result._sample("unnamed_rejection", body, code, details)


def names_field(details: str, roots: Iterable[str]) -> bool:
    """Whether `details` starts with `field: ` for a field path whose root is one of `roots`."""
    match = FIELD_PREFIX.match(details)
    return match is not None and match.group(1) in set(roots)


def _caller(
    channel: grpc.aio.Channel, method: str, metadata: Sequence[tuple[str, str]], timeout_s: float
) -> Callable[[bytes], Any]:
    """An async function sending one raw body (no serializer: the bytes go as they are) and
    returning (code, details); streamed answers are read to the end."""
    service, _, name = method.strip("/").rpartition("/")
    descriptor = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    streams_in, streams_out = descriptor.client_streaming, descriptor.server_streaming
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[streams_in, streams_out]
    stub = kind(method)

    async def one(body: bytes) -> tuple[grpc.StatusCode, str]:
        request = iter([body]) if streams_in else body
        try:
            answer = stub(request, timeout=timeout_s, metadata=tuple(metadata))
            if streams_out:
                async for _ in answer:
                    pass
            else:
                await answer
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    return one


def generate(
    request_class: type[Message], n: int, known: Mapping[str, Sequence[Any]] | None = None,
    corrupt_share: float = 0.2, seed: int = 0, valid: Mapping[str, Any] | None = None,
) -> list[bytes]:
    """`n` request bodies: about `corrupt_share` of them not valid messages, the rest random ones
    (with `valid`, half of those are `valid` with one field drawn at random)."""
    build = _build(request_class)
    structured = message_strategy(request_class.DESCRIPTOR, known or {}).map(build)
    if valid:
        structured = st.one_of(structured, _near(request_class.DESCRIPTOR, dict(valid), known or {}).map(build))
    corrupt = st.one_of(st.binary(max_size=256), st.tuples(structured, st.integers(0, 2**16), _DAMAGE).map(_damage))
    # A message without fields has one structured form (empty): every other input is raw bytes.
    n_corrupt = round(n * corrupt_share) if request_class.DESCRIPTOR.fields else n
    return _draw(structured, n - n_corrupt, seed) + _draw(corrupt, n_corrupt, seed + 1)


def _near(descriptor: Descriptor, valid: dict[str, Any], known: Mapping[str, Sequence[Any]]) -> st.SearchStrategy[dict]:
    """`valid` (the fields this message has) with one of its fields replaced by a random value."""
    valid = {name: value for name, value in valid.items() if name in descriptor.fields_by_name}
    fields = st.sampled_from(list(descriptor.fields))
    return fields.flatmap(lambda field: _field(field, known, 0).map(lambda value: {**valid, field.name: value}))


def _draw(strategy: st.SearchStrategy[bytes], n: int, seed: int) -> list[bytes]:
    """`n` examples of `strategy` (fewer if Hypothesis runs out of distinct ones)."""
    drawn: list[bytes] = []
    if n <= 0:
        return drawn

    @hypothesis_seed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(strategy)
    def collect(body: bytes) -> None:
        drawn.append(body)

    collect()
    return drawn[:n]


def message_strategy(descriptor: Descriptor, known: Mapping[str, Sequence[Any]], depth: int = 0) -> st.SearchStrategy[dict]:
    """Keyword arguments for the message's constructor: any subset of its fields, each random."""
    if depth >= MAX_DEPTH:
        return st.just({})
    optional = {field.name: _field(field, known, depth) for field in descriptor.fields}
    return st.fixed_dictionaries({}, optional=optional)


def _field(field: FieldDescriptor, known: Mapping[str, Sequence[Any]], depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = (field.message_type.fields_by_name[name] for name in ("key", "value"))
        return st.dictionaries(_single(key, known, depth), _single(value, known, depth), max_size=8)
    single = _single(field, known, depth)
    if not field.is_repeated:
        return single
    return st.one_of(st.lists(single, max_size=6), st.builds(_repeat, single, st.integers(0, 5000)))


def _single(field: FieldDescriptor, known: Mapping[str, Sequence[Any]], depth: int) -> st.SearchStrategy[Any]:
    random = _random_value(field, known, depth)
    values = [_typed(field, v) for v in known.get(field.name, ())]
    return st.one_of(st.sampled_from(values), random) if values else random


def _typed(field: FieldDescriptor, value: Any) -> Any:
    """A known value as the field takes it: one list of texts serves string and bytes fields."""
    if field.type == FieldDescriptor.TYPE_BYTES and isinstance(value, str):
        return value.encode()
    if field.type == FieldDescriptor.TYPE_STRING and isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _random_value(field: FieldDescriptor, known: Mapping[str, Sequence[Any]], depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(field.message_type, known, depth + 1)
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL_TEXT), _huge(st.text(min_size=1, max_size=4)))
    if kind == FieldDescriptor.TYPE_BYTES:
        text = st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL_TEXT)).map(str.encode)
        return st.one_of(st.binary(max_size=40), text, _huge(st.binary(min_size=1, max_size=4)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers parse
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 1000))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(width=width))
    low, high = INT_RANGES[kind]
    return st.one_of(st.sampled_from([0, 1, -1 if low else 2, low, high]), st.integers(low, high))


def _huge(unit: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Long strings or bytes, by repetition: drawing each character would be slow."""
    return st.builds(lambda piece, times: piece * times, unit, st.integers(100, 20_000))


def _repeat(element: Any, times: int) -> list[Any]:
    """A long repeated field: `times` copies, fewer when they would exceed REPEAT_MAX_BYTES."""
    return [element] * min(times, REPEAT_MAX_BYTES // max(1, _size(element)))


def _size(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return len(value) + 2
    if isinstance(value, dict):
        return sum(_size(k) + _size(v) for k, v in value.items()) + 2
    if isinstance(value, list):
        return sum(_size(v) for v in value) + 2
    return 9


def _build(request_class: type[Message]) -> Callable[[dict], bytes]:
    def build(fields: dict) -> bytes:
        try:
            return request_class(**fields).SerializeToString()
        except (ValueError, TypeError):  # a value protobuf refuses to hold: send the empty message
            return request_class().SerializeToString()

    return build


# Damage to a valid body: at the given offset, or appended (a field the parser must reject).
_DAMAGE = st.sampled_from([
    "truncate", "flip", "insert",
    b"\x0f",                       # a tag with the reserved wire type 7
    b"\x0a\xff\xff\xff\x0f",        # field 1, length-delimited, longer than the body
    b"\x0a\x02\xff\xfe",            # field 1 as 2 bytes of invalid UTF-8 (bad for a string field)
    b"\x08" + b"\xff" * 11,         # a varint of 11 bytes
    b"\x0b",                       # a group start without its end
    b"\x00",                       # field number 0
])


def _damage(parts: tuple[bytes, int, str | bytes]) -> bytes:
    body, at, how = parts
    if isinstance(how, bytes):
        return body + how
    if not body:
        return b"\xff"
    at %= len(body)
    if how == "truncate":
        return body[:at]
    if how == "flip":
        return body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
    return body[:at] + b"\xff\xff\xff" + body[at:]
