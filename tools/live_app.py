"""`python app.py` (or another entry script) in a subprocess on a free 127.0.0.1 port, for tests and benchmarks that
call it over HTTP the way a stranger would; its output goes to a log file they can read. `root` runs another
checkout's app.py (benchmarks/bench_abuse.py compares against the code before a change)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from tools.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LiveApp:
    url: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def live_app(env: dict[str, str], log: Path, script: list[str] | None = None, timeout: float = 180,
             root: Path = ROOT) -> Iterator[LiveApp]:
    """The app with a clean CHATBOT_*/GRADIO_* environment plus `env`; stopped (SIGTERM, then kill) on exit."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("CHATBOT_", "GRADIO_")) and k not in ("SYSTEM", "SPACE_ID")}
    full_env.update({"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                     "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env})
    url = f"http://127.0.0.1:{port}/"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *(script or ["app.py"])], cwd=root, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                assert proc.poll() is None, f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"the app did not answer within {timeout:.0f} s"
                time.sleep(0.25)
            yield LiveApp(url, proc, log)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
