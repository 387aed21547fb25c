"""A task's training examples nearest a text by sentence-embedding similarity (the generate
expert's retrieval-augmented prompt).

The embedder is the offline all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling
over the tokens, L2-normalised, so a dot product is the cosine similarity. A task's index is
computed once and kept under TANDEM_CACHE_DIR/retrieval, keyed by a hash of the texts and
the model, so a restarted replica reads it back instead of embedding the training set again.
"""

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tandem import envs
from tandem.fsio import atomic_write
from tandem.tasks import Example

# sentence-transformers' max_seq_length for all-MiniLM-L6-v2 (sentence_bert_config.json).
MAX_TOKENS = 256
BATCH = 64


class Embedder(Protocol):
    fingerprint: str  # changes whenever the vectors would

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised float32 row per text."""


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on torch (already in every replica for vLLM)."""

    def __init__(self) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel

        from cloud.training.base_model import base_dir
        from cloud.training.quiet import quiet_third_party

        quiet_third_party()
        model_dir = Path(base_dir(None))  # the offline MiniLM
        # One thread (process-wide): the engine holds a core of its own. Two threads took
        # 650 ms a query on a loaded 2-core machine, one thread 20 ms.
        torch.set_num_threads(1)
        self._torch = torch
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.enable_padding()
        self._model = AutoModel.from_pretrained(model_dir).eval()
        self.fingerprint = _file_digest(model_dir / "model.safetensors")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        # Batches of similar lengths: padding is most of the work otherwise.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self._model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(order), BATCH):
            rows = order[start:start + BATCH]
            out[rows] = self._encode_batch([texts[i] for i in rows])
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        encodings = self._tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings])
        mask = torch.tensor([e.attention_mask for e in encodings])
        with torch.inference_mode():
            hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=-1).numpy()


@dataclass(frozen=True)
class Neighbour:
    example: Example
    similarity: float


class ExampleIndex:
    """Training examples and their embeddings; `nearest` ranks them by cosine similarity."""

    def __init__(self, examples: Sequence[Example], vectors: np.ndarray) -> None:
        if len(examples) != len(vectors):
            raise ValueError(f"{len(examples)} examples but {len(vectors)} vectors")
        self.examples = list(examples)
        self.vectors = vectors

    def nearest(self, query: np.ndarray, k: int) -> list[Neighbour]:
        """The k most similar examples, most similar first."""
        similarities = self.vectors @ query
        k = min(k, len(similarities))
        top = np.argpartition(-similarities, k - 1)[:k]
        top = top[np.argsort(-similarities[top], kind="stable")]
        return [Neighbour(self.examples[i], float(similarities[i])) for i in top]


def load_index(examples: Sequence[Example], embedder: Embedder, cache_dir: Path | None = None) -> ExampleIndex:
    """The index of `examples`, read from the cache or embedded (and cached) now."""
    path = (cache_dir or envs.TANDEM_CACHE_DIR / "retrieval") / f"{index_key(examples, embedder)}.npy"
    try:
        vectors = np.load(path)
    except (OSError, ValueError, EOFError):  # absent or damaged: embed again
        vectors = embedder.encode([e.text for e in examples])
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        atomic_write(path, buffer.getvalue())
    return ExampleIndex(examples, vectors)


def index_key(examples: Sequence[Example], embedder: Embedder) -> str:
    """A hash of the model and the texts (labels are not embedded, but read with the vectors)."""
    digest = hashlib.sha256(f"{embedder.fingerprint}\n{MAX_TOKENS}\n".encode())
    for e in examples:
        digest.update(e.text.encode() + b"\0")
    return digest.hexdigest()[:32]


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

