"""Building vLLM's async engine for an expert (imported only inside replicas)."""

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
