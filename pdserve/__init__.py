"""pdserve: LLM serving with disaggregated prefill and decode."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pdserve.engine.llm import LLM, CompletionOutput, RequestOutput
    from pdserve.engine.sampler import SamplingParams


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # Lazy: `import pdserve.sched` or `pdserve.sim` must not pull in torch.
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from pdserve.engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from pdserve.engine.sampler import SamplingParams

        return SamplingParams
    raise AttributeError(name)


__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
