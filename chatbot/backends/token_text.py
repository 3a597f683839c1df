"""Generated tokens to streamed text, as llama-cpp-python's streaming completion emits it: a UTF-8 character
split over several tokens waits for its last byte, and text that may be the start of a stop string (the chat
template's end-of-turn text) waits until it is clearly not one; a stop string ends the reply before it."""
from __future__ import annotations

import codecs
import ctypes

import llama_cpp


def token_piece(vocab, token: int, special: bool = False) -> bytes:
    """A token's bytes from llama.cpp's vocabulary (special tokens as text only when `special`)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:  # a longer piece: -n bytes
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


class TextStream:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.held = ""
        self.stopped = False  # a stop string was generated: nothing more comes out

    def push(self, piece: bytes) -> str:
        """Feed one token's bytes; returns the text that can be shown now."""
        if self.stopped:
            return ""
        self.held += self.decoder.decode(piece)
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            text, self.held = self.held[:min(found)], ""
            return text
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.held)), 0, -1)
                    if self.held.endswith(s[:k])), default=0)
        text, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return text

    def flush(self) -> str:
        """The reply ended (end of turn or length): whatever was held back."""
        if self.stopped:
            return ""
        text, self.held = self.held + self.decoder.decode(b"", final=True), ""
        return text
