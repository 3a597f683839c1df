"""Keeps what visitors send out of the server log.

Gradio prints a traceback for every request it cannot process, and the messages of two common errors quote the
value that was sent: pydantic's validation errors (`input_value='…'`) and Gradio's own processing errors ("the value
passed to the event handler was: '…'"). When that value is a chat, the quote is someone's messages. install() wraps
stdout and stderr so those quotes are written as <redacted>; everything else passes unchanged.
"""
from __future__ import annotations

import re
import sys
from typing import TextIO

REDACTIONS = [
    (re.compile(r"input_value=.*?, input_type="), "input_value=<redacted>, input_type="),
    (re.compile(r"(value (?:passed to|returned from) the event handler was: ).*? \(of type"), r"\1<redacted> (of type"),
]


def redact(text: str) -> str:
    for pattern, replacement in REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactingStream:
    """A text stream that writes everything to `stream`, with the quoted values redacted."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str):  # flush, fileno, isatty, encoding, ...
        return getattr(self.stream, name)


def install() -> None:
    """Redact sys.stdout and sys.stderr from now on (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
