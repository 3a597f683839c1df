"""The openai backend against a tiny hand-written OpenAI-compatible SSE server and against llama-cpp-python's own
server on the embedded GGUF, both on 127.0.0.1 (no network)."""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chatbot.backends import GenerationParams, load_backend
from chatbot.settings import ConfigError, load_settings
from tools.ports import free_port

WORDS = ["Hello", " from", " the", " fake", " server", "."]


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay: float = 0.0, key: str | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.delay, self.key = delay, key
        self.requests: list[dict] = []
        self.disconnected = threading.Event()
        self.sent = 0


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args):
        pass

    def _authorised(self) -> bool:
        if self.server.key and self.headers.get("Authorization") != f"Bearer {self.server.key}":
            self._json(401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}})
            return False
        return True

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self._authorised():
            self._json(200, {"object": "list", "data": [{"id": "served-model", "object": "model",
                                                        "created": 0, "owned_by": "test"}]})

    def do_POST(self):
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        words = WORDS[:body.get("max_tokens") or len(WORDS)]
        finish = "length" if len(words) < len(WORDS) else "stop"
        try:
            for i, word in enumerate(words):
                self._event({"role": "assistant", "content": word} if i == 0 else {"content": word}, None)
                self.server.sent += 1
                time.sleep(self.server.delay)
            self._event({}, finish)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnected.set()

    def _event(self, delta: dict, finish: str | None) -> None:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "served-model",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()


@pytest.fixture
def server(request):
    srv = FakeServer(**getattr(request, "param", {}))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def backend_for(srv: FakeServer, **env):
    return load_backend(load_settings({"CHATBOT_BACKEND": "openai",
                                       "CHATBOT_OPENAI_BASE_URL": f"http://127.0.0.1:{srv.server_port}/v1", **env}))


def test_streams_the_servers_reply_with_our_parameters(server):
    backend = backend_for(server)
    assert backend.model_name == "served-model"  # unset CHATBOT_MODEL: the first model the server lists
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    params = GenerationParams(max_new_tokens=50, temperature=0.4, top_p=0.7, seed=3, min_p=0.1, repeat_penalty=1.15)
    chunks = list(backend.stream(messages, params))
    assert [c.text for c in chunks[:-1]] == WORDS and chunks[-1].finish_reason == "stop"
    sent = server.requests[0]
    assert sent["messages"] == messages and sent["stream"] is True and sent["model"] == "served-model"
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["seed"]) == (50, 0.4, 0.7, 3)
    # Passed through under the names llama.cpp's server (repeat_penalty) and vLLM (repetition_penalty) read.
    assert (sent["min_p"], sent["repeat_penalty"], sent["repetition_penalty"]) == (0.1, 1.15, 1.15)


def test_length_finish_and_explicit_model(server):
    backend = backend_for(server, CHATBOT_MODEL="my-model")
    chunks = list(backend.stream([{"role": "user", "content": "Hi"}], GenerationParams(max_new_tokens=2)))
    assert "".join(c.text for c in chunks) == "Hello from" and chunks[-1].finish_reason == "length"
    assert server.requests[0]["model"] == "my-model"


@pytest.mark.parametrize("server", [{"delay": 0.2}], indirect=True)
def test_cancel_closes_the_http_stream(server):
    backend = backend_for(server)
    cancel = threading.Event()
    chunks = []
    for chunk in backend.stream([{"role": "user", "content": "Hi"}], GenerationParams(), cancel):
        chunks.append(chunk)
        cancel.set()
    assert [c.finish_reason for c in chunks] == [None, "cancelled"]
    assert server.disconnected.wait(5)  # the server saw the client go away mid-reply
    assert server.sent < len(WORDS)


def test_count_tokens_is_a_growing_estimate(server):
    backend = backend_for(server, CHATBOT_N_CTX="1024")
    assert backend.n_ctx == 1024
    short = backend.count_tokens([{"role": "user", "content": "hi"}])
    long = backend.count_tokens([{"role": "user", "content": "hi " * 300}])
    assert 0 < short < long and long >= 900 / 4


def test_unreachable_server_fails_with_one_line():
    port = free_port()  # nothing listens there
    with pytest.raises(ConfigError) as info:
        load_backend(load_settings({"CHATBOT_BACKEND": "openai",
                                    "CHATBOT_OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1"}))
    assert str(info.value).startswith(f"CHATBOT_OPENAI_BASE_URL='http://127.0.0.1:{port}/v1'")
    assert "\n" not in str(info.value) and "accepted:" in str(info.value)


@pytest.mark.parametrize("server", [{"key": "right"}], indirect=True)
def test_wrong_key_names_openai_api_key(server):
    with pytest.raises(ConfigError, match=r"^OPENAI_API_KEY .*accepted:"):
        backend_for(server, OPENAI_API_KEY="wrong")
    assert backend_for(server, OPENAI_API_KEY="right").model_name == "served-model"


# ---------------------------------------------------------------------------------------------------------------
# A real OpenAI-compatible server: llama-cpp-python's own `python -m llama_cpp.server` serving the embedded GGUF on
# 127.0.0.1 (the server extras are in requirements-dev.txt). The fake server above stays for what a real one cannot
# be made to do on demand: a slow stream, a refused key, exact request bodies.

# llama.cpp's repacked (AMX) kernels stay off, as in the app (chatbot.backends.llama_cpp.extra_buffers).
SERVER_LAUNCHER = ("import runpy; from chatbot.backends.llama_cpp import extra_buffers\n"
                   "with extra_buffers(False): runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")
SERVED_AS = "smollm2-test"


@pytest.fixture(scope="module")
def llama_server(smollm2_gguf, tmp_path_factory):
    """(base URL, the server's log file) of `python -m llama_cpp.server` on a free local port, one thread."""
    import subprocess
    import sys

    import httpx

    from training.paths import REPO_ROOT

    port, log_path = free_port(), tmp_path_factory.mktemp("llama-server") / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVER_LAUNCHER, "--model", str(smollm2_gguf),
                                 "--model_alias", SERVED_AS, "--host", "127.0.0.1", "--port", str(port),
                                 "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1",
                                 "--last_n_tokens_size", "64",
                                 # a generation runs to its end unless its own client goes away (the default
                                 # cuts it short for the next request, which would hide one the stop missed)
                                 "--interrupt_requests", "False"],
                                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/v1", time.time() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.3)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def real_backend(llama_server, **env):
    url, _ = llama_server
    return load_backend(load_settings({"CHATBOT_BACKEND": "openai", "CHATBOT_OPENAI_BASE_URL": url, **env}))


def test_real_server_streams_what_llama_cpp_decodes_in_process(llama_server, smollm2_gguf):
    """The model the server lists is used; greedy with a repetition penalty and min-p (not in OpenAI's API, sent in
    the request body) gives the very text the app's own llama_cpp backend decodes from the same GGUF: the parameters
    arrive and mean the same there."""
    from chatbot.backends.llama_cpp import extra_buffers

    backend = real_backend(llama_server)
    assert backend.model_name == SERVED_AS
    messages = [{"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "Why is the sea salty?"}]
    params = GenerationParams(max_new_tokens=40, temperature=0.0, repeat_penalty=1.3, min_p=0.1, seed=1)
    chunks = list(backend.stream(messages, params))
    served = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason in ("stop", "length") and len(served.split()) > 3
    with extra_buffers(False):
        local = load_backend(load_settings({"CHATBOT_BACKEND": "llama_cpp", "CHATBOT_MODEL": str(smollm2_gguf),
                                            "CHATBOT_THREADS": "1", "CHATBOT_N_CTX": "2048", "CHATBOT_PARALLEL": "1"}))
    assert served == "".join(c.text for c in local.stream(messages, params))
    plain = "".join(c.text for c in backend.stream(messages, GenerationParams(max_new_tokens=40, temperature=0.0,
                                                                              repeat_penalty=1.0, min_p=0.0)))
    assert plain != served  # the penalty changed the reply: it was not ignored


def test_real_server_stops_at_max_new_tokens(llama_server):
    chunks = list(real_backend(llama_server).stream([{"role": "user", "content": "Write a long story about a cat."}],
                                                    GenerationParams(max_new_tokens=5, temperature=0.0)))
    assert chunks[-1].finish_reason == "length" and 0 < sum(c.tokens for c in chunks) <= 5


def test_stop_in_the_app_ends_the_real_servers_generation(llama_server):
    """The app's stream (chatbot.reply.stream_reply, what Gradio closes when a visitor presses stop) over the openai
    backend: closing it closes the HTTP stream, and the server says the client went away and stops decoding.

    llama-cpp-python's server prints llama.cpp's timings (`llama_perf_context_print: eval time = ... / N runs`) when a
    generation reaches its end, and serves one request at a time: had the 1500-token generation gone on decoding
    after the stop, the next request would wait for it and its timings would come first. The next request's are the
    only ones after the stop: the generation ended there."""
    from chatbot.reply import stream_reply

    _, log_path = llama_server
    started = len(log_path.read_text())
    reply = stream_reply(real_backend(llama_server), [{"role": "user", "content": "Write a long story about a cat."}],
                         GenerationParams(max_new_tokens=1500, temperature=0.0))
    before = log_path.read_text().count("Disconnected from client")
    assert next(text for text, _stats in reply if text)  # the reply started streaming
    reply.close()  # the stop button
    deadline = time.time() + 20
    while log_path.read_text().count("Disconnected from client") == before:
        assert time.time() < deadline, log_path.read_text()[-2000:]
        time.sleep(0.2)
    chunks = list(real_backend(llama_server).stream([{"role": "user", "content": "Hi"}],
                                                    GenerationParams(max_new_tokens=3, temperature=0.0)))
    assert chunks[-1].finish_reason == "length"
    since = log_path.read_text()[started:]
    runs = [int(n) for n in re.findall(r"^llama_perf_context_print: +eval time = .* / +(\d+) runs", since, re.M)]
    assert len(runs) == 1 and runs[0] <= 3, since[-3000:]  # the short request's own: at most its 3 tokens
