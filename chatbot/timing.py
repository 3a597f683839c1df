"""Time to first token and decode speed of one streamed reply: the definitions the app's stats line, the
benchmarks and the evaluation share."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


def decode_rate(tokens_after_first: int, seconds: float) -> float | None:
    """Decode tokens/s: tokens after the first text over the time from first to last text (the first token's
    time is prompt processing, reported as TTFT). None when there is nothing to divide."""
    return tokens_after_first / seconds if tokens_after_first > 0 and seconds > 0 else None


@dataclass
class ReplyClock:
    """Feed it every chunk as it arrives (`clock.add(text, tokens)`); read ttft, decode_s and decode_tps."""
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None   # when the first text arrived
    last: float | None = None    # when the latest text arrived
    tokens: int = 0              # all tokens so far
    tokens_at_first: int = 0     # tokens up to and including the chunk with the first text

    def add(self, text: str, tokens: int = 1, at: float | None = None) -> None:
        at = time.perf_counter() if at is None else at
        self.tokens += tokens
        if text:
            if self.first is None:
                self.first, self.tokens_at_first = at, self.tokens
            self.last = at

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def decode_s(self) -> float:
        return 0.0 if self.first is None else self.last - self.first

    @property
    def decode_tps(self) -> float | None:
        return decode_rate(self.tokens - self.tokens_at_first, self.decode_s)
