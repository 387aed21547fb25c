"""The `classify` expert: a sequence-classification checkpoint on vLLM's pooling runner.

vLLM returns the raw logits (`use_activation=False`); the runner scales them by the
checkpoint's temperature and adds its out-of-scope class (`tandem.open_set`), both fitted at
training and kept in the checkpoint's manifest.json.
"""

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cloud.config import ExpertConfig
from cloud.experts.protocol import Answer
from tandem.contract import MANIFEST_FILE, Manifest
from tandem.open_set import answer_labels, probabilities
from tandem.tasks import Task

log = logging.getLogger(__name__)

TOP_K = 5


class ClassifyRunner:
    def __init__(self, engine: Any, cfg: ExpertConfig, tasks: Mapping[str, Task]) -> None:
        self._engine = engine
        self._labels = checkpoint_labels(cfg.model_path())
        manifest = _manifest(Path(cfg.model_path()))
        self._temperature = (manifest and manifest.temperature) or 1.0
        self._boundary = manifest.out_of_scope if manifest else None
        answers = answer_labels(self._labels, self._boundary)
        for route, task in tasks.items():
            # A checkpoint without a boundary (not one of Tandem's teachers) still serves, closed set.
            if set(answers) | {task.oos_label} != set(task.label_names()):
                raise ValueError(f"expert {cfg.name}: the checkpoint answers {len(answers)} labels, which differ "
                                 f"from task {route}'s {len(task.label_names())} (label_set_version "
                                 f"{task.label_set_version}); retrain it on the task file")
        self._answers = answers
        # A text longer than the model's context is classified on its first tokens, as the
        # student does with its max_length: vLLM refuses a longer prompt outright, which would
        # turn a valid escalation into a failure of the expert.
        self._tokenization = {"truncation": True, "max_length": cfg.max_model_len}

    async def answer(self, text: str, task: str, request_id: str) -> Answer:
        from vllm import PoolingParams

        final = None
        async for output in self._engine.encode(text, PoolingParams(task="classify", use_activation=False),
                                                request_id=request_id, tokenization_kwargs=self._tokenization):
            final = output
        logits = np.asarray(final.outputs.data, dtype=np.float64)
        probs = probabilities(logits / self._temperature, self._labels, self._boundary)
        top = np.argsort(-probs)[:TOP_K]
        distribution = [(self._answers[i], float(probs[i])) for i in top]
        return Answer(distribution[0][0], distribution[0][1], distribution)


def checkpoint_labels(model_dir: str) -> list[str]:
    """The label order of a Hugging Face classification checkpoint (its id2label)."""
    from transformers import AutoConfig

    id2label = AutoConfig.from_pretrained(model_dir).id2label
    return [id2label[i] for i in range(len(id2label))]


def _manifest(model_dir: Path) -> Manifest | None:
    """The checkpoint's manifest (Tandem's teachers have one); None for another checkpoint,
    which then answers uncalibrated and never out of scope."""
    if not (model_dir / MANIFEST_FILE).exists():
        log.warning("%s has no %s: no temperature or out-of-scope boundary; every answer is one of its labels",
                    model_dir, MANIFEST_FILE)
        return None
    return Manifest.read(model_dir)
