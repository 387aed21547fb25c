"""The generate expert on the real SmolLM2 engine (vLLM on CPU) with the real MiniLM
retrieval, for a small task cut from banking77 (five intents, 20 training texts each, so that
its index builds in a second)."""

import csv
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cloud.config import ExpertConfig
from tandem import envs
from tandem.tasks import Task, banking77

pytestmark = [
    pytest.mark.integration,
    # torch's own, from a module vLLM's engine imports in this process.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

INTENTS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "terminate_account", "change_pin"]
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def small_task(tmp_path_factory: pytest.TempPathFactory) -> Task:
    shipped = banking77()
    data = tmp_path_factory.mktemp("task")
    for split, per_intent in (("train", 20), ("test", 2)):
        examples = shipped.load(split)
        rows = [e for intent in INTENTS for e in [x for x in examples if x.label == intent][:per_intent]]
        with (data / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *((e.text, e.label) for e in rows)])
    descriptions = shipped.descriptions()
    return Task(name="small", train=data / "train.csv", test=data / "test.csv",
                labels={intent: descriptions[intent] for intent in INTENTS})


@pytest.fixture(scope="module")
def expert_cfg() -> ExpertConfig:
    from cloud.prepare import SMOLLM2_DIR, prepare_smollm2

    model = prepare_smollm2(envs.TANDEM_CACHE_DIR / "models" / SMOLLM2_DIR)
    return ExpertConfig(name="llm", kind="generate", model=str(model), max_model_len=MAX_MODEL_LEN)


@pytest_asyncio.fixture(scope="module")
async def engine(expert_cfg: ExpertConfig) -> AsyncIterator[Any]:
    from cloud.experts.engine import build_engine

    with pytest.MonkeyPatch.context() as env:
        for name, value in expert_cfg.env.items():  # read by the engine process it starts
            env.setenv(name, value)
        # In a list the teardown empties: this generator's frame outlives the fixture, and an
        # engine first collected at interpreter exit fails in vLLM's __del__.
        engines = [build_engine(expert_cfg)]
    try:
        yield engines[0]
    finally:
        engines.pop().shutdown()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runner(engine: Any, expert_cfg: ExpertConfig, small_task: Task, cache_dir: Path) -> Any:
    from cloud.experts.generate import GenerateRunner

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TANDEM_CACHE_DIR", str(cache_dir))
        return GenerateRunner(engine, expert_cfg, {"small": small_task})


def test_the_tasks_index_is_cached(runner: Any, cache_dir: Path) -> None:
    assert len(list((cache_dir / "retrieval").glob("*.npy"))) == 1


async def test_answers_are_labels_with_a_distribution_whose_first_is_the_answer(runner: Any, small_task: Task) -> None:
    labels = set(small_task.label_names())
    tests = small_task.load("test")
    correct = 0
    for i, example in enumerate(tests):
        answer = await runner.answer(example.text, "small", f"q-{i}")
        probabilities = [p for _, p in answer.distribution]
        assert {label for label, _ in answer.distribution} <= labels and small_task.oos_label in dict(answer.distribution)
        assert answer.distribution[0] == (answer.label, answer.confidence)
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1)
        correct += answer.label == example.label
    assert correct >= 0.8 * len(tests)


async def test_a_candidate_whose_own_tokens_were_cached_is_scored_again_with_the_same_result(
        runner: Any, engine: Any, small_task: Task) -> None:
    # White-box: a text whose prompt ends just before a cache block boundary, so that asking
    # again finds the out-of-scope candidate's first tokens in vLLM's prefix cache, where they
    # have no log-probs; the third time, in the scoring requests' own cache too.
    block = engine.vllm_config.cache_config.block_size
    route = runner._routes["small"]
    completion, answer_tokens = len(route.completions[small_task.oos_label]), runner._params(route.labels).max_tokens
    for padding in range(block):
        text = "my card still has not arrived" + " yet" * padding
        prompt, _ = runner._fitted(route, text, await runner._neighbours(route, text), answer_tokens)
        if min((len(prompt) + completion) // block * block, len(prompt) + completion - 1) >= len(prompt):
            break
    else:
        pytest.fail(f"no padding puts a {block}-token block boundary inside the out-of-scope label")
    answers = [await runner.answer(text, "small", f"again-{i}") for i in range(3)]
    for answer in answers[1:]:  # equal up to bf16 rounding: computed in other batches
        assert answer.label == answers[0].label
        assert dict(answer.distribution) == pytest.approx(dict(answers[0].distribution), abs=0.02)


async def test_a_text_past_max_model_len_is_answered_on_its_first_tokens(runner: Any, small_task: Task) -> None:
    answer = await runner.answer("my card has not arrived " * 400, "small", "long")
    assert answer.label in small_task.label_names()


def test_a_task_whose_prompt_cannot_fit_is_refused_at_start(engine: Any, expert_cfg: ExpertConfig, small_task: Task) -> None:
    from cloud.experts.generate import GenerateRunner

    tiny = expert_cfg.model_copy(update={"max_model_len": 64, "prompt": "descriptions"})
    with pytest.raises(ValueError, match="task small's prompt .* past max_model_len 64"):
        GenerateRunner(engine, tiny, {"small": small_task})
