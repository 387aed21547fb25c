"""The learning-loop benchmark's traffic: the part of a task's train split that no student
learns from directly."""

from cloud.training.data import Splits, tokenizer
from cloud.training.distill_data import labelled_seed
from cloud.training.loop import encode
from tandem.tasks import Example, Task


def traffic_examples(task: Task, splits: Splits, seed_fraction: float, max_length: int) -> list[Example]:
    """Train examples neither in the labelled seed nor held out: what the learning-loop
    benchmark streams through the system as traffic."""
    seed = labelled_seed(splits.train, seed_fraction)
    excluded = {tuple(x) for x in seed.ids + splits.val.ids + splits.calib.ids}
    examples = task.load("train")
    ids = encode(tokenizer(splits.base_model), [e.text for e in examples], max_length)
    return [e for e, x in zip(examples, ids) if tuple(x) not in excluded]
