"""Runs the transformers backend the way a ZeroGPU Space runs it, on a CPU, in a process of its own:

    python tests/zerogpu_harness.py MODEL_DIR  ->  one JSON object on stdout (tests/test_zerogpu.py reads it)

Real: `spaces` 0.51 imported with SPACES_ZERO_GPU=true, its spaces.GPU generator wrapper, its forked worker with
pickled arguments and chunks, its stop event when the consumer closes the generator, its HTTP client for the
device API; the app's settings, backend and model. Stood in: the device API (a server on 127.0.0.1 that grants
every request the same "GPU" and records what it was asked) and `spaces.zero.torch`, the CUDA emulation, which
imports only with a CUDA build of torch and whose worker init moves tensors to a GPU (here a no-op: the model
stays on the CPU). A separate process because importing `spaces` on ZeroGPU patches gradio's launch for good.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CALLS: list[dict] = []  # what the device API was asked, in order


class DeviceAPI(BaseHTTPRequestHandler):
    """ZeroGPU's device API as spaces/zero/api.py calls it: /schedule, /allow, /release."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        CALLS.append({"path": url.path, **query})
        body = b""
        if url.path == "/schedule":
            idle = sum(c["path"] == "/schedule" for c in CALLS) > 1  # the one GPU is idle after the first call
            body = json.dumps({"idle": idle, "nvidiaIndex": 0, "nvidiaUUID": "GPU-standin",
                               "allowToken": f"token-{len(CALLS)}"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def cuda_emulation_standin() -> types.ModuleType:
    """spaces.zero.torch's interface with nothing to emulate: no GPU, so nothing to pack, patch or move."""
    module = types.ModuleType("spaces.zero.torch")
    for name in ("enter_mode", "patch", "unpatch", "init", "move"):
        setattr(module, name, lambda *args, **kwargs: None)
    module.pack = module.size = lambda *args, **kwargs: 0
    module.is_in_bad_fork = lambda *args, **kwargs: False
    return module


def main(model_dir: str) -> dict:
    server = ThreadingHTTPServer(("127.0.0.1", 0), DeviceAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cgroup = Path(tempfile.mkdtemp(prefix="zerogpu-harness-")) / "cgroup"
    cgroup.write_text("0::/harness\n")
    os.environ.update(SPACES_ZERO_GPU="true", SPACES_ZERO_DEVICE_API_URL=f"http://127.0.0.1:{server.server_port}",
                      ZEROGPU_PROC_SELF_CGROUP_PATH=str(cgroup))
    sys.modules["spaces.zero.torch"] = cuda_emulation_standin()

    from chatbot import zerogpu
    from chatbot.backends import GenerationParams, load_backend
    from chatbot.settings import load_settings

    backend = load_backend(load_settings({"CHATBOT_BACKEND": "transformers", "CHATBOT_MODEL": model_dir,
                                          "CHATBOT_THREADS": "1", "CHATBOT_N_CTX": "2048"}))
    # Shared memory a fork inherits: which process ran the model, how often, and the last prompt it processed.
    forwards, forward_pid, prefill = (multiprocessing.Value("i", 0) for _ in range(3))
    original = backend.model.forward

    def counted(*args, **kwargs):
        forwards.value += 1
        forward_pid.value = os.getpid()
        if kwargs["input_ids"].shape[1] > 1:
            prefill.value = kwargs["input_ids"].shape[1]
        return original(*args, **kwargs)

    backend.model.forward = counted
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
    greedy = GenerationParams(max_new_tokens=24, temperature=0.0, repeat_penalty=1.1)
    endless = GenerationParams(max_new_tokens=1500, temperature=1.0, top_p=1.0, min_p=0.0, seed=3)
    out: dict = {"app_pid": os.getpid(), "prompt_tokens": backend.count_tokens(messages),
                 "zerogpu": backend.on_zerogpu, "device": backend.placement.device}

    def schedules():
        return [c for c in CALLS if c["path"] == "/schedule"]

    def run(name, params, stop_after_text=None):
        """One reply; `stop_after_text` = "close" or "cancel" ends it after its first text."""
        expected = zerogpu.gpu_seconds(params.max_new_tokens, backend.speed.estimate())
        cancel = threading.Event()
        prefill.value = 0
        before, started = forwards.value, time.perf_counter()
        stream = backend.stream(messages, params, cancel)
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if chunk.text and stop_after_text == "close":
                stream.close()
                break
            if chunk.text and stop_after_text == "cancel":
                cancel.set()
        ended = forwards.value
        time.sleep(0.5)  # long enough for a runaway decoder to add many tokens
        out[name] = {"text": "".join(c.text for c in chunks), "finish": chunks[-1].finish_reason,
                     "tokens": sum(c.tokens for c in chunks), "forwards": ended - before,
                     "forwards_later": forwards.value - ended, "pid": forward_pid.value, "prefill": prefill.value,
                     "reserved": int(schedules()[-1]["durationSeconds"]), "expected_reserved": expected,
                     "seconds": round(time.perf_counter() - started, 2),
                     "lock_free": backend.lock.acquire(blocking=False)}
        if out[name]["lock_free"]:
            backend.lock.release()

    run("reply", greedy)
    run("closed", endless, stop_after_text="close")
    run("cancelled", endless, stop_after_text="cancel")
    run("again", greedy)
    out["device_api"] = CALLS
    out["estimate"] = backend.speed.estimate()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
