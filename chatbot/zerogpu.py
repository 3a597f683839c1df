"""ZeroGPU: how the transformers backend borrows a GPU per reply, and how many seconds it asks for.

On a ZeroGPU Space (SPACES_ZERO_GPU=true) the `spaces` package emulates CUDA in the app's process: the weights
are loaded and moved "to cuda" once at start-up, and a GPU is attached only while a function wrapped with
`spaces.GPU` runs. That function runs in a worker process forked from the app (kept for later calls when the
same GPU comes back idle); its arguments and every chunk it yields are pickled across the process boundary, and
when the app closes the generator it got back, the worker closes the real one after its next chunk.
So the wrapped function takes only plain data (messages, GenerationParams, the seconds reserved) and touches
nothing a fork does not carry: no lock, no cancel event, no kept KV cache (chatbot/backends/transformers.py).
Off ZeroGPU `spaces` is not imported at all and nothing here changes how the backend runs.

The duration rule: a reply reserves `gpu_seconds(max_new_tokens, speed)` of the visitor's daily ZeroGPU quota,

    min(CAP_S, ceil(START_S + max_new_tokens / tokens_per_s))

where tokens_per_s is the slowest decode rate of the last SPEED_WINDOW replies this process served (PRIOR_TOKENS_PER_S
before the first). Decoding stops START_S before the reservation ends (finish reason "length"), so a reply is
cut, not aborted, when the cap or a slow GPU would overrun it.
"""
from __future__ import annotations

import math
import os
from collections import deque
from typing import Callable, Iterator, Mapping

from chatbot.settings import ConfigError
from chatbot.timing import decode_rate

START_S = 5                  # GPU seconds before the first token: worker start, weights to the GPU, the prompt
CAP_S = 60                   # the most one reply reserves (ZeroGPU's own default duration)
PRIOR_TOKENS_PER_S = 20.0    # decode rate assumed before a reply was measured (HF generate, 1B model, bf16)
SPEED_WINDOW = 8             # replies the measured rate looks back over
MIN_MEASURED_TOKENS = 16     # shorter replies say too little about the rate to count


def on_zerogpu(env: Mapping[str, str] = os.environ) -> bool:
    """SPACES_ZERO_GPU as `spaces` itself reads it (spaces/config.py: 1, t or true)."""
    return (env.get("SPACES_ZERO_GPU") or "").strip().lower() in ("1", "t", "true")


def activate(env: Mapping[str, str] = os.environ) -> bool:
    """On ZeroGPU, import `spaces` now, before anything touches CUDA (it patches torch at import); returns whether
    this process is on ZeroGPU."""
    if not on_zerogpu(env):
        return False
    try:
        import spaces  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError("SPACES_ZERO_GPU=true is not valid without the spaces package; accepted: a ZeroGPU Space "
                          "built from requirements-zerogpu.txt (tools/deploy_space.py --hardware zero-a10g)") from None
    return True


def gpu_seconds(max_new_tokens: int, tokens_per_s: float) -> int:
    """Seconds of GPU one reply reserves (the duration passed to spaces.GPU)."""
    return int(min(CAP_S, math.ceil(START_S + max_new_tokens / tokens_per_s)))


def decode_budget(seconds: int) -> float:
    """Seconds decoding may take inside a reservation of `seconds` (generate's max_time)."""
    return max(1.0, seconds - START_S)


class DecodeSpeed:
    """Decode tokens/s of the last replies, measured where their chunks arrive; the estimate is the slowest."""

    def __init__(self, prior: float = PRIOR_TOKENS_PER_S, window: int = SPEED_WINDOW):
        self.prior = prior
        self.recent: deque[float] = deque(maxlen=window)

    def record(self, tokens_after_first: int, seconds: float) -> None:
        rate = decode_rate(tokens_after_first, seconds)
        if rate is not None and tokens_after_first >= MIN_MEASURED_TOKENS:
            self.recent.append(rate)

    def estimate(self) -> float:
        return min(self.recent) if self.recent else self.prior


def reserved(messages, params, seconds: int) -> int:
    """spaces.GPU's duration callable: it gets the wrapped function's arguments; the reservation is one of them."""
    return seconds


def on_gpu(reply: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """`reply(messages, params, seconds)` wrapped with spaces.GPU: each call runs in ZeroGPU's forked worker with
    a GPU attached for `seconds` at most. Call only after activate() returned True."""
    import spaces

    return spaces.GPU(reply, duration=reserved)
