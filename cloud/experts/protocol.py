"""What every expert kind returns, and the interface the deployment drives."""

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Answer:
    label: str
    confidence: float
    # (label, probability), most probable first; may cover only the top labels.
    distribution: list[tuple[str, float]]


class Runner(Protocol):
    async def answer(self, text: str, task: str, request_id: str) -> Answer:
        """Classifies `text` into one of the labels of `task` (a route the runner was built with),
        its out-of-scope label included."""
