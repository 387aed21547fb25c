"""Third-party output that is not Tandem's, silenced at its source, so that whoever trains a
model or runs the demo sees Tandem's progress and report rather than library internals."""

import contextlib
import logging
import warnings
from collections.abc import Iterator


def quiet_third_party() -> None:
    """transformers' load report for every model (heads newly initialised and layers left out,
    both on purpose here) and its weight-loading progress bars."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


class _RootRecords(logging.Filter):
    """Drops records logged on the root logger itself; records of named loggers pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root"


@contextlib.contextmanager
def quiet_onnx_tools() -> Iterator[None]:
    """For the block: the dynamo exporter's warnings (torchvision ops it skips, deprecations
    inside torch, dynamic axes it renames) and onnxruntime quantisation's advice, which it
    logs on the root logger."""
    exporter = logging.getLogger("torch.onnx")
    level = exporter.level
    exporter.setLevel(logging.ERROR)
    root_records = _RootRecords()
    logging.root.addFilter(root_records)
    try:
        with warnings.catch_warnings():
            # Only the exporter's own (torch, onnxscript, onnx): a warning of Tandem's still shows.
            for category in (FutureWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(torch|onnxscript|onnx)(\.|$)")
            # torch's pytree deprecation, raised from the stdlib's copyreg as the exporter copies specs.
            warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
            yield
    finally:
        logging.root.removeFilter(root_records)
        exporter.setLevel(level)
