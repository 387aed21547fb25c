"""A student artifact loaded for serving: tokenizer, ONNX Runtime session, calibration."""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge.errors import ArtifactError
from tandem.open_set import answer_labels, probabilities
from tandem.contract import (
    LABELS_FILE,
    MANIFEST_FILE,
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
    """Maps texts to calibrated label probabilities. Thread-safe for `predict`.

    Built from bytes in memory: with the updater on, the very bytes that were verified
    (`tandem.signing.verify_artifact`), so nothing is read from disk again after the check.
    """

    def __init__(self, manifest: Manifest, files: Mapping[str, bytes], options: SessionOptions = SessionOptions(),
                 source: str = "artifact") -> None:
        """`source` names where the files came from, in errors."""
        missing = [name for name in STUDENT_FILES if name != MANIFEST_FILE and name not in files]
        if missing:
            raise ArtifactError(f"{source}: missing {missing}")
        if manifest.temperature is None or manifest.max_length is None:
            raise ArtifactError(f"{source}: unreadable artifact: a student manifest needs temperature and max_length")
        model = files[MODEL_FILE]
        if hashlib.sha256(model).hexdigest() != manifest.sha256:
            raise ArtifactError(f"{source}: {MODEL_FILE} does not match the manifest's sha256")
        try:
            model_labels: list[str] = json.loads(files[LABELS_FILE])
            self._tokenizer = Tokenizer.from_str(files[TOKENIZER_FILE].decode())
        except Exception as exc:  # json, UTF-8, and tokenizers (which raises bare Exception)
            raise ArtifactError(f"{source}: unreadable artifact: {type(exc).__name__}: {exc}") from exc
        self.manifest = manifest
        self.version = manifest.version
        self.temperature = manifest.temperature
        self.out_of_scope = manifest.out_of_scope
        self._model_labels = model_labels
        # What `predict` scores: the model's labels, and the out-of-scope one if it has a boundary.
        self.labels = answer_labels(model_labels, manifest.out_of_scope)
        self._tokenizer.enable_truncation(manifest.max_length)
        self._tokenizer.no_padding()
        try:
            self._session = ort.InferenceSession(model, _session_options(options), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own untyped errors for bad graphs
            raise ArtifactError(f"{source}: ONNX Runtime cannot load {MODEL_FILE}: {exc}") from exc
        n_out = self._session.get_outputs()[0].shape[-1]
        if n_out != len(model_labels):
            raise ArtifactError(f"{source}: model has {n_out} outputs for {len(model_labels)} labels")

    @classmethod
    def load(cls, directory: Path, options: SessionOptions = SessionOptions()) -> "Student":
        """An unverified artifact directory (the updater off, benchmarks, tests): each file read once."""
        try:
            manifest = Manifest.read(directory)
            files = {name: (directory / name).read_bytes() for name in STUDENT_FILES if name != MANIFEST_FILE}
        except FileNotFoundError as exc:
            raise ArtifactError(f"{directory}: missing {Path(exc.filename).name}") from exc
        except ValueError as exc:  # pydantic's ValidationError, a manifest that is not JSON
            raise ArtifactError(f"{directory}: unreadable artifact: {type(exc).__name__}: {exc}") from exc
        return cls(manifest, files, options, str(directory))

    def predict(self, texts: list[str]) -> np.ndarray:
        """Calibrated probabilities, shape (len(texts), len(labels)), out of scope included.

        One ONNX Runtime run per text, on purpose: dynamic int8 quantisation scales
        activations over the whole input tensor, so in a shared tensor one text's answer
        would depend on its batch-mates (a daemon test checks answers do not change under
        load). Padding to a shared length also cost more than batching saved, on banking77's
        short texts.
        """
        logits = np.empty((len(texts), len(self._model_labels)), dtype=np.float32)
        for row, encoding in enumerate(self._tokenizer.encode_batch(texts)):
            ids = np.array([encoding.ids], dtype=np.int64)
            feed = {_INPUT_IDS: ids, _ATTENTION_MASK: np.ones_like(ids)}
            logits[row] = self._session.run([ONNX_OUTPUT], feed)[0][0]
        return probabilities(logits / self.temperature, self._model_labels, self.out_of_scope)

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
