"""The `generate` expert: an instruct LLM that answers with one of the task's labels.

One escalation, in three steps:
1. The prompt lists the labels: their names (`ExpertConfig.prompt` "names"), or each with
   its description from the task file ("descriptions"); "retrieval" adds, before the text,
   the `retrieval_k` training examples nearest it by embedding similarity, with their labels.
   The task's out-of-scope label is always listed, described.
2. A constrained answer: vLLM's structured outputs admit only whole labels.
3. A distribution: candidate labels (the constrained answer; the retrieved examples' labels,
   or without retrieval the labels the answer's runner-up tokens lead to; at most
   `retrieval_k` of them; and the out-of-scope label) are each scored by their
   log-probability as the completion of the prompt, normalised over the candidates. They
   are scored after the answer, on the prompt it left in vLLM's prefix cache, so each costs
   only the prompt's last cache block and its own tokens. The returned label is the most
   probable candidate, its confidence that probability.

Every candidate comes from the label set, so nothing outside it can come back. Greedy
constrained decoding alone is a poor classifier here: it commits to the first token the
model prefers (SmolLM2 starts its answers with a capital, so `Refund_not_showing_up` took
most answers), where a whole label's probability does not.
"""

import asyncio
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cloud.config import ExpertConfig
from cloud.errors import InvalidAnswer
from cloud.experts.protocol import Answer
from cloud.experts.retrieval import Embedder, ExampleIndex, Neighbour
from tandem.tasks import Task

OUT_OF_SCOPE_DESCRIPTION = "fits none of the other intents"
VLLM_MAX_LOGPROBS = 20  # the most logprobs vLLM returns per token unless its engine is told otherwise
INSTRUCTION = ("You classify customer messages by intent. Answer with exactly one intent from this list, "
               "the one that best matches the message:")


def label_lines(task: Task, mode: str) -> str:
    """The label list of the system prompt: names, or `name: description` lines; the
    out-of-scope label is described either way."""
    given = task.descriptions()
    descriptions = given if mode != "names" else dict.fromkeys(given, "")
    descriptions[task.oos_label] = given[task.oos_label] or OUT_OF_SCOPE_DESCRIPTION
    return "\n".join(f"- {name}: {text}" if text else f"- {name}" for name, text in descriptions.items())


def system_prompt(task: Task, mode: str) -> str:
    return f"{INSTRUCTION}\n{label_lines(task, mode)}"


def user_message(text: str, neighbours: Sequence[Neighbour]) -> str:
    """The text to classify; with retrieved examples, written as one more of them, after them
    (the most similar last, nearest the answer: small models weigh what they read last)."""
    if not neighbours:
        return text
    shots = "".join(f"Message: {n.example.text.strip()}\nIntent: {n.example.label}\n\n" for n in reversed(neighbours))
    return f"Labelled messages similar to this one:\n\n{shots}Message: {text}\nIntent:"


@dataclass(frozen=True)
class Step:
    """One token of the constrained answer: the answer's text before it, the chosen token's
    log-prob, and the other allowed tokens' text -> log-prob (vLLM's logprobs, taken after
    the grammar mask: a distribution over the allowed tokens only)."""

    prefix: str
    logprob: float
    alternatives: dict[str, float]


def runner_up_labels(steps: Sequence[Step], labels: Sequence[str]) -> list[str]:
    """The labels of the branches the constrained answer passed by, the most probable
    branch first (labels within a branch in task order)."""
    branches: list[tuple[float, str]] = []
    before = 0.0
    for step in steps:
        branches += [(before + lp, step.prefix + token) for token, lp in step.alternatives.items() if math.isfinite(lp)]
        before += step.logprob
    found: list[str] = []
    for _, branch in sorted(branches, key=lambda b: -b[0]):
        found += [label for label in labels if label.startswith(branch) and label not in found]
    return found


def candidate_labels(answer: str, others: Sequence[str], out_of_scope: str, k: int) -> list[str]:
    """The labels to score: the constrained answer and the first `others` (the retrieved
    examples' labels, or else the answer's runner-ups), k in all, then the out-of-scope label."""
    pool: list[str] = []
    for label in [answer, *others]:
        if label not in pool and label != out_of_scope and len(pool) < k:
            pool.append(label)
    return [*pool, out_of_scope]


def normalised(scores: dict[str, float]) -> list[tuple[str, float]]:
    """Log-probabilities -> probabilities over these labels, most probable first."""
    top = max(scores.values())
    weights = {label: math.exp(s - top) for label, s in scores.items()}
    total = sum(weights.values())
    return sorted(((label, w / total) for label, w in weights.items()), key=lambda p: -p[1])


def scoring_tiers() -> list[tuple[Any, dict[str, str]]]:
    """The ways to request a candidate's log-prob, cheapest first (see `GenerateRunner._logprob`):
    SamplingParams and the prompt's cache salt."""
    from vllm import SamplingParams

    # prompt_logprobs turns off reading the prefix cache by default, as cached rows get no
    # log-probs; the first two tiers read it anyway and check the rows they use were computed.
    cached = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, skip_reading_prefix_cache=False)
    uncached = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    return [(cached, {}), (cached, {"cache_salt": "scoring"}), (uncached, {})]


@dataclass
class Route:
    """A task as this expert prompts for it."""

    task: Task
    labels: tuple[str, ...]
    system: str
    completions: dict[str, list[int]]  # label -> its tokens and the end of the assistant's turn
    index: ExampleIndex | None


class GenerateRunner:
    def __init__(self, engine: Any, cfg: ExpertConfig, tasks: dict[str, Task],
                 embedder: Embedder | None = None) -> None:
        """`embedder`: for the retrieval prompt (default: the offline MiniLM), built only then."""
        self._engine = engine
        self._cfg = cfg
        self._tokenizer = engine.get_tokenizer()
        if cfg.prompt == "retrieval" and embedder is None:
            from cloud.experts.retrieval import MiniLMEmbedder

            embedder = MiniLMEmbedder()
        self._embedder = embedder if cfg.prompt == "retrieval" else None
        # One SamplingParams per label set: vLLM caches the compiled grammar across requests.
        self._params_by_labels: dict[tuple[str, ...], Any] = {}
        end = self._turn_end()
        self._routes = {name: self._route(name, task, end) for name, task in tasks.items()}
        self._scoring = scoring_tiers()

    async def answer(self, text: str, task: str, request_id: str) -> Answer:
        route = self._routes[task]
        neighbours = await self._neighbours(route, text)
        params = self._params(route.labels)
        prompt, shown = self._fitted(route, text, neighbours, params.max_tokens)
        label, steps = await self._constrained(prompt, params, request_id)
        if label not in route.completions:
            raise InvalidAnswer(f"answer {label[:64]!r} is not a label of task {task}")
        others = ([n.example.label for n in shown if n.example.label in route.completions] if route.index is not None
                  else runner_up_labels(steps, route.labels))
        candidates = candidate_labels(label, others, route.task.oos_label, self._cfg.retrieval_k)
        scores = await asyncio.gather(*(self._logprob(prompt, route.completions[c], f"{request_id}/{i}")
                                        for i, c in enumerate(candidates)))
        distribution = normalised(dict(zip(candidates, scores)))
        return Answer(distribution[0][0], distribution[0][1], distribution)

    async def _neighbours(self, route: Route, text: str) -> list[Neighbour]:
        if route.index is None:
            return []
        # Off the event loop: the encoder holds no lock other requests need (torch frees the GIL).
        query = (await asyncio.to_thread(self._embedder.encode, [text]))[0]
        return route.index.nearest(query, self._cfg.retrieval_k)

    async def _constrained(self, prompt: list[int], params: Any, request_id: str) -> tuple[str, list[Step]]:
        final = await self._final({"prompt_token_ids": prompt}, params, request_id)
        completion = final.outputs[0]
        if completion.finish_reason == "length":
            # The grammar only ends on a whole label; stopping early leaves a prefix.
            raise InvalidAnswer(
                f"answer cut off after {len(completion.token_ids)} tokens ({completion.text!r}): "
                f"the {len(final.prompt_token_ids)}-token prompt leaves too little of max_model_len"
            )
        steps, prefix = [], ""
        for token, top in zip(completion.token_ids, completion.logprobs or []):
            chosen = top[token]
            steps.append(Step(prefix, chosen.logprob,
                              {lp.decoded_token or "": lp.logprob for t, lp in top.items() if t != token}))
            prefix += chosen.decoded_token or ""
        return completion.text.strip(), steps

    async def _logprob(self, prompt: list[int], completion: list[int], request_id: str) -> float:
        """log P(completion | prompt), from the prompt log-probs of prompt + completion.

        The rows of tokens read from the prefix cache get no log-probs, so a request whose
        cache hit reached into the completion is sent again: first where only scoring requests
        are cached (their own salt; the system prompt is there, the answer's decoded tokens, the
        usual cause, are not), then, if the same prompt and completion were scored before,
        computed whole."""
        for tier, (params, salt) in enumerate(self._scoring):
            output = await self._final({"prompt_token_ids": prompt + completion, **salt}, params, f"{request_id}/{tier}")
            if (output.num_cached_tokens or 0) < len(prompt):
                break
        rows = output.prompt_logprobs[len(prompt):]
        return sum(row[token].logprob for token, row in zip(completion, rows))

    async def _final(self, prompt: dict[str, Any], params: Any, request_id: str) -> Any:
        final = None
        async for output in self._engine.generate(prompt, params, request_id=request_id):
            final = output
        return final

    def _fitted(self, route: Route, text: str, neighbours: list[Neighbour],
                answer_tokens: int) -> tuple[list[int], list[Neighbour]]:
        """The prompt's tokens and the examples it shows. If prompt and answer would not fit in
        max_model_len (vLLM refuses a longer prompt outright, which would turn a valid escalation
        into a failure of the expert), the least similar examples go first, then the text is cut
        to its first tokens (the classify expert truncates likewise)."""
        budget = self._cfg.max_model_len - answer_tokens
        shown = list(neighbours)
        prompt = self._encode(route, text, shown)
        while len(prompt) > budget and shown:
            shown.pop()
            prompt = self._encode(route, text, shown)
        excess = len(prompt) - budget
        if excess > 0:
            ids = self._tokenizer.encode(text, add_special_tokens=False)
            prompt = self._encode(route, self._tokenizer.decode(ids[: max(0, len(ids) - excess)]), shown)
        return prompt, shown

    def _encode(self, route: Route, text: str, neighbours: Sequence[Neighbour]) -> list[int]:
        messages = [{"role": "system", "content": route.system}, {"role": "user", "content": user_message(text, neighbours)}]
        rendered = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes its special tokens as text; encoding must not add them again.
        return self._tokenizer.encode(rendered, add_special_tokens=False)

    def _route(self, name: str, task: Task, end: str) -> Route:
        labels = tuple(task.label_names())
        completions = {label: self._tokenizer.encode(label + end, add_special_tokens=False) for label in labels}
        route = Route(task, labels, system_prompt(task, self._cfg.prompt), completions, None)
        fixed = len(self._encode(route, "", [])) + self._params(labels).max_tokens
        if fixed > self._cfg.max_model_len:
            raise ValueError(f"expert {self._cfg.name}: task {name}'s prompt and answer take {fixed} tokens with no "
                             f"text at all, past max_model_len {self._cfg.max_model_len}")
        if self._embedder is not None:
            from cloud.experts.retrieval import load_index

            route.index = load_index(task.load("train"), self._embedder)
        return route

    def _turn_end(self) -> str:
        """What the chat template writes right after an assistant's answer (its end-of-turn
        marker): part of a label's probability, so that a label that begins another does not
        score as the longer one's start."""
        marker = "\x00LABEL\x00"
        turn = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
        after = self._tokenizer.apply_chat_template(turn, tokenize=False).split(marker, 1)[1]
        return re.match(r"\s*\S*", after).group()

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
            # Without retrieval, the runner-up tokens at each step name the other candidates.
            logprobs=None if self._cfg.prompt == "retrieval" else min(self._cfg.retrieval_k, VLLM_MAX_LOGPROBS),
            structured_outputs=StructuredOutputsParams(choice=list(labels)),
        )
