"""A free local TCP port, for starting `python app.py` or a stand-in server in tests, benchmarks and CI."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; closed again before returning)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
