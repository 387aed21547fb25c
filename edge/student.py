"""A student artifact loaded for serving: tokenizer, ONNX Runtime session, calibration."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge.errors import ArtifactError
from tandem.contract import (
    LABELS_FILE,
    MODEL_FILE,
    ONNX_INPUTS,
    ONNX_OUTPUT,
    STUDENT_FILES,
    TOKENIZER_FILE,
    Manifest,
)

_INPUT_IDS, _ATTENTION_MASK = ONNX_INPUTS


@dataclass(frozen=True)
class SessionOptions:
    intra_op_threads: int = 1
    allow_spinning: bool = False


class Student:
    """Maps texts to calibrated label probabilities. Thread-safe for `predict`."""

    def __init__(self, directory: Path, options: SessionOptions = SessionOptions()) -> None:
        missing = [name for name in STUDENT_FILES if not (directory / name).is_file()]
        if missing:
            raise ArtifactError(f"{directory}: missing {missing}")
        model = (directory / MODEL_FILE).read_bytes()
        try:
            self.manifest = Manifest.read(directory)
            self.labels: list[str] = json.loads((directory / LABELS_FILE).read_text())
            self._tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as exc:  # json, pydantic, and tokenizers (which raises bare Exception)
            raise ArtifactError(f"{directory}: unreadable artifact: {type(exc).__name__}: {exc}") from exc
        if self.manifest.temperature is None or self.manifest.max_length is None:
            raise ArtifactError(f"{directory}: unreadable artifact: a student manifest needs temperature and max_length")
        self.version = self.manifest.version
        self.temperature = self.manifest.temperature
        self._tokenizer.enable_truncation(self.manifest.max_length)
        if hashlib.sha256(model).hexdigest() != self.manifest.sha256:
            raise ArtifactError(f"{directory}: {MODEL_FILE} does not match the manifest's sha256")
        self._tokenizer.no_padding()
        try:
            self._session = ort.InferenceSession(model, _session_options(options), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own untyped errors for bad graphs
            raise ArtifactError(f"{directory}: ONNX Runtime cannot load {MODEL_FILE}: {exc}") from exc
        n_out = self._session.get_outputs()[0].shape[-1]
        if n_out != len(self.labels):
            raise ArtifactError(f"{directory}: model has {n_out} outputs for {len(self.labels)} labels")

    def predict(self, texts: list[str]) -> np.ndarray:
        """Calibrated probabilities, shape (len(texts), len(labels)).

        One ONNX Runtime run per text, on purpose: dynamic int8 quantisation scales
        activations over the whole input tensor, so in a shared tensor one text's answer
        would depend on its batch-mates (a daemon test checks answers do not change under
        load). Padding to a shared length also cost more than batching saved, on banking77's
        short texts.
        """
        logits = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        for row, encoding in enumerate(self._tokenizer.encode_batch(texts)):
            ids = np.array([encoding.ids], dtype=np.int64)
            feed = {_INPUT_IDS: ids, _ATTENTION_MASK: np.ones_like(ids)}
            logits[row] = self._session.run([ONNX_OUTPUT], feed)[0][0]
        logits /= self.temperature
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=-1, keepdims=True)

    def probe(self, texts: list[str]) -> None:
        """Answers `texts` (warming the session up) or raises ArtifactError: a version that
        loads but cannot answer, or answers with non-finite probabilities, must not serve."""
        try:
            probs = self.predict(texts)
        except Exception as exc:  # ORT raises its own untyped errors at run time too
            raise ArtifactError(f"version {self.version} failed its probe: {type(exc).__name__}: {exc}") from exc
        if not np.isfinite(probs).all():
            raise ArtifactError(f"version {self.version} failed its probe: non-finite probabilities")


def _session_options(options: SessionOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
    return so
