"""Building vLLM's async engine for an expert (imported only inside replicas)."""

import contextlib
import gc
import os
from collections.abc import Iterator
from typing import Any

from cloud.config import ExpertConfig


def build_engine(cfg: ExpertConfig) -> Any:
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=cfg.model_path(),
        runner="pooling" if cfg.kind == "classify" else "generate",
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        enforce_eager=cfg.enforce_eager,
        # A replica's output is a forwarded log, where a progress bar is a line per redraw.
        **{"use_tqdm_on_load": False, **cfg.engine_args},
    )
    return AsyncLLM.from_engine_args(args)


@contextlib.contextmanager
def local_engine(cfg: ExpertConfig) -> Iterator[Any]:
    """An expert's engine in this process (benchmarks, tests), in the environment a replica
    would give it, shut down at the end of the block."""
    os.environ.update(cfg.env)  # vLLM reads its CPU settings from there
    engines = [build_engine(cfg)]
    try:
        yield engines[0]
    finally:
        engines[0].shutdown()
        # Collected now, not at interpreter exit, where vLLM's __del__ fails on torn-down modules.
        engines.clear()
        gc.collect()
