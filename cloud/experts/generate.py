"""The `generate` expert: an instruct LLM that must answer with one of the task's labels.

vLLM's structured outputs constrain the answer to the label set (so nothing outside it
can come back), and the answer's log-probability gives its confidence. The grammar
mask is applied before sampling, so that probability is over the allowed labels only.
"""

import math
from typing import Any

from cloud.errors import InvalidAnswer
from cloud.experts.protocol import Answer


def system_prompt(labels: tuple[str, ...]) -> str:
    # Labels only: banking77's "descriptions" would be the names again, doubling the prefill.
    lines = "\n".join(f"- {label}" for label in labels)
    return (
        "You classify customer messages. Answer with exactly one label from this list, "
        f"the one that best matches the message's intent:\n{lines}"
    )


class GenerateRunner:
    def __init__(self, engine: Any, max_tokens: int) -> None:
        """`max_tokens`: the engine's max_model_len."""
        self._engine = engine
        self._max_tokens = max_tokens
        self._tokenizer = engine.get_tokenizer()
        # One SamplingParams per label set: vLLM caches the compiled grammar across requests.
        self._params_by_labels: dict[tuple[str, ...], Any] = {}

    async def answer(self, text: str, labels: list[str], request_id: str) -> Answer:
        final = None
        params = self._params(tuple(labels))
        async for output in self._engine.generate(self._fitted_prompt(text, tuple(labels), params.max_tokens), params,
                                                  request_id=request_id):
            final = output
        completion = final.outputs[0]
        if completion.finish_reason == "length":
            # The grammar only ends on a whole label; stopping early leaves a prefix.
            raise InvalidAnswer(
                f"answer cut off after {len(completion.token_ids)} tokens ({completion.text!r}): "
                f"the {len(final.prompt_token_ids)}-token prompt leaves too little of max_model_len"
            )
        label = completion.text.strip()
        confidence = math.exp(completion.cumulative_logprob or 0.0)
        return Answer(label, confidence, [(label, confidence)])

    def _fitted_prompt(self, text: str, labels: tuple[str, ...], answer_tokens: int) -> str:
        """The prompt, with the text cut to its first tokens if prompt and answer would not fit
        in max_model_len: vLLM refuses a longer prompt outright, which would turn a valid
        escalation into a failure of the expert (the classify expert truncates likewise)."""
        prompt = self._prompt(text, labels)
        excess = len(self._tokenizer.encode(prompt, add_special_tokens=False)) + answer_tokens - self._max_tokens
        if excess <= 0:
            return prompt
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        return self._prompt(self._tokenizer.decode(ids[: max(0, len(ids) - excess)]), labels)

    def _prompt(self, text: str, labels: tuple[str, ...]) -> str:
        messages = [{"role": "system", "content": system_prompt(labels)}, {"role": "user", "content": text}]
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _params(self, labels: tuple[str, ...]) -> Any:
        if labels not in self._params_by_labels:
            self._params_by_labels[labels] = self._build_params(labels)
        return self._params_by_labels[labels]

    def _build_params(self, labels: tuple[str, ...]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        # The grammar admits any tokenisation of a label, not only the canonical one (SmolLM2
        # was seen spelling "Refund" in 4 tokens, not 2): leave ample room, since a cut-off
        # answer would be a label prefix.
        longest = max(len(self._tokenizer.encode(label, add_special_tokens=False)) for label in labels)
        return SamplingParams(
            temperature=0.0,
            max_tokens=2 * longest + 8,
            logprobs=1,
            structured_outputs=StructuredOutputsParams(choice=list(labels)),
        )
