"""The edge daemon's local API under random and corrupt input: it keeps answering, never
answers INTERNAL or UNKNOWN, and every refusal names its field."""

import json
import logging
from pathlib import Path

import grpc
import pytest

from benchmarks.fuzz import fuzz_rpc, names_field
from edge.config import CloudLinkConfig, PolicyConfig
from tandem.v1 import edge_pb2

from .conftest import running_daemon

pytestmark = pytest.mark.integration

INPUTS = 300
TEXTS = ["my card has not arrived", "I can't find my PIN \U0001f600"]  # valid: some inputs get past the checks


@pytest.mark.parametrize(("method", "request_class"), [("Infer", edge_pb2.InferRequest), ("Correct", edge_pb2.CorrectRequest)])
async def test_fuzzed_rpc_keeps_answering_and_names_every_refused_field(
    student_dir: Path, cloud: tuple[object, str], method: str, request_class: type, caplog: pytest.LogCaptureFixture
) -> None:
    _, target = cloud  # feedback needs a cloud to deliver to, or Correct refuses every call
    labels = json.loads((student_dir / "labels.json").read_text())
    fields = {"policy": PolicyConfig(mode="edge_only"), "cloud": CloudLinkConfig(target=target, insecure=True)}
    async with running_daemon(student_dir, **fields) as (daemon, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
            result = await fuzz_rpc(channel, f"/tandem.v1.Edge/{method}", request_class, INPUTS,
                                    known={"task": ["banking77"], "label": labels[:3], "text": TEXTS}, seed=7,
                                    valid={"task": "banking77", "text": TEXTS[0].encode(), "label": labels[0]})
    assert result.inputs == INPUTS
    assert (result.crashes, result.internal_or_unknown, result.unnamed_rejections) == (0, 0, 0), result.samples
    assert result.codes["OK"] > 0 and result.codes["INVALID_ARGUMENT"] > 0, result.codes
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("edge")]


@pytest.mark.parametrize("body", [b"\xff", b"\x0a\xff\xff\xff\x0f", b"\x0a\x02\xff\xfe", b"\x08" + b"\xff" * 11])
async def test_a_corrupt_body_is_invalid_argument_naming_the_request_without_a_traceback(
    student_dir: Path, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_daemon(student_dir, policy=PolicyConfig(mode="edge_only")) as (daemon, stub):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/tandem.v1.Edge/Infer")(body, timeout=5)
        assert (await stub.Infer(edge_pb2.InferRequest(task="banking77", text=b"still there?"), timeout=5)).label
        rejected = daemon.registry.get_sample_value("tandem_edge_rejected_total", {"field": "InferRequest"})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert names_field(info.value.details(), ["InferRequest"]), info.value.details()
    assert "tandem.v1.InferRequest" in info.value.details() and rejected == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def test_a_refusal_names_a_field_only_with_a_field_path_prefix() -> None:
    roots = ["records", "task"]
    assert names_field("records[3].edge.label: 'x' is not a label", roots)
    assert names_field("task: unknown task 'weather'", roots)
    assert not names_field("bad request", roots)
    assert not names_field("text: too long", roots)  # not a field of this request
    assert not names_field("Unexpected <class 'DecodeError'>: Error parsing message", roots)
