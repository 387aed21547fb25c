"""Training configuration: one `TrainConfig` per task, from YAML plus TANDEM_TRAIN_* overrides."""

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from tandem import envs
from tandem.settings import TandemSettings
from tandem.tasks import TaskSpec, banking77


class FitConfig(BaseModel):
    """How one model is trained."""

    layers: int | None = Field(
        None, ge=1, le=6, description="Keep the first N MiniLM layers; None keeps all six."
    )
    epochs: float = Field(3.0, gt=0, description="Passes over the training data.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (linear warm-up and decay).")
    head_lr: float = Field(
        5e-3, gt=0, description="Learning rate of the pooler and classifier head: MiniLM's sentence "
        "embeddings were trained mean-pooled, so the CLS head starts far from useful.",
    )
    warmup: float = Field(0.1, ge=0, lt=1, description="Fraction of steps spent warming up.")
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(64, ge=8, le=512, description="Tokens kept per text.")
    max_examples: int | None = Field(
        None, ge=1, description="Train on at most this many examples (quick runs, tests)."
    )


class TrainConfig(TandemSettings):
    """What `tandem train` reads."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_TRAIN_")

    task: TaskSpec = Field(default_factory=banking77, description="The task to train for.")
    output_dir: Path | None = Field(
        None, description="Where artifacts go; default: TANDEM_CACHE_DIR/models/<task>."
    )
    seed: int = 0
    val_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of train held out to fit the temperature."
    )
    teacher: FitConfig = FitConfig()
    student: FitConfig = FitConfig(layers=2, lr=3e-4)

    def model_dir(self, kind: str) -> Path:
        root = self.output_dir or envs.TANDEM_CACHE_DIR / "models" / self.task.name
        return root / kind
