"""ONNX export, int8 quantisation and ONNX Runtime evaluation of a trained classifier."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import PreTrainedModel

from cloud.training.loop import collate
from cloud.training.quiet import quiet_onnx_tools
from tandem.contract import ONNX_INPUTS, ONNX_OUTPUT


class _Logits(torch.nn.Module):
    """The classifier with the edge's two inputs and one output: segment ids are always 0."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).logits


def export_onnx(model: PreTrainedModel, path: Path) -> None:
    """fp32 ONNX (dynamo exporter, opset 18) with dynamic batch and sequence axes."""
    wrapper = _Logits(model).eval()  # the wrapper too: a new Module starts in training mode
    dummy = (torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long))
    axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    with quiet_onnx_tools():
        torch.onnx.export(
            wrapper,
            dummy,
            str(path),
            input_names=list(ONNX_INPUTS),
            output_names=[ONNX_OUTPUT],
            dynamic_shapes=dict.fromkeys(ONNX_INPUTS, axes),
            opset_version=18,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the weights, per output channel."""
    with quiet_onnx_tools():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def onnx_logits(path: Path, ids: list[list[int]], batch_size: int = 64) -> np.ndarray:
    """Logits from ONNX Runtime, in input order (what the edge will compute)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels = session.get_outputs()[0].shape[-1]  # static: only batch and sequence are dynamic
    out = np.zeros((len(ids), labels), dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        inputs = (t.numpy() for t in collate([ids[i] for i in rows]))
        out[rows] = session.run([ONNX_OUTPUT], dict(zip(ONNX_INPUTS, inputs)))[0]
    return out
