"""The `classify` expert: a sequence-classification checkpoint on vLLM's pooling runner."""

from typing import Any

import numpy as np

from cloud.experts.protocol import Answer

TOP_K = 5


class ClassifyRunner:
    def __init__(self, engine: Any, model_labels: list[str], max_tokens: int) -> None:
        """`max_tokens`: the engine's max_model_len."""
        self._engine = engine
        self._labels = model_labels
        # A text longer than the model's context is classified on its first tokens, as the
        # student does with its max_length: vLLM refuses a longer prompt outright, which would
        # turn a valid escalation into a failure of the expert.
        self._tokenization = {"truncation": True, "max_length": max_tokens}

    async def answer(self, text: str, labels: list[str], request_id: str) -> Answer:
        from vllm import PoolingParams

        final = None
        async for output in self._engine.encode(text, PoolingParams(task="classify"), request_id=request_id,
                                                tokenization_kwargs=self._tokenization):
            final = output
        probs = np.asarray(final.outputs.data, dtype=np.float64)
        top = np.argsort(-probs)[:TOP_K]
        distribution = [(self._labels[i], float(probs[i])) for i in top]
        return Answer(distribution[0][0], distribution[0][1], distribution)


def checkpoint_labels(model_dir: str) -> list[str]:
    """The label order of a Hugging Face classification checkpoint (its id2label)."""
    from transformers import AutoConfig

    id2label = AutoConfig.from_pretrained(model_dir).id2label
    return [id2label[i] for i in range(len(id2label))]
