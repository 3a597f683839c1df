"""Start `python app.py` with no settings (embedded SmolLM2, no network), ask one question through the API, stop it."""
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.ports import free_port  # noqa: E402

port = free_port()
env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
proc = subprocess.Popen([sys.executable, "app.py"], env=env)
try:
    from gradio_client import Client

    deadline = time.time() + 180
    while True:
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"app.py did not come up (exit code {proc.poll()})")
            time.sleep(1)
    reply = client.predict("Hello! Who are you?", api_name="/chat")
    print("app.py answered:", repr(reply)[:200])
    if not str(reply).strip():
        sys.exit("app.py answered with empty text")
finally:
    proc.terminate()
    proc.wait(timeout=30)
