"""The public Space as a stranger sees it: `python app.py` on 127.0.0.1, called over real HTTP (raw posts to
/gradio_api/..., gradio_client) with what a browser would never send. Floods are bounded in count and time.

Feedback is written only for replies the server streamed in that session, within limits; no caller skips the queue;
non-finite settings get a notice; the server log does not quote what visitors sent; SIGTERM pushes pending feedback.
With the embedded SmolLM2 (the model's own behaviour): a retry is a fresh sample with the prompt cache on, an
oversized system prompt is refused before the model, an oversized history is cut before it is tokenised."""
from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tools.gradio_http import Tab, final_output, first_text_seconds, join_queue, post_run, text_message
from tools.live_app import LiveApp, live_app

MIB = 2**20


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def client(app: LiveApp):
    from gradio_client import Client

    return Client(app.url, verbose=False)


# --- the mock backend: the app's own rules ---------------------------------------------------------------------

@pytest.fixture(scope="module", params=["local", "spaces"])
def mock_app(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"feedback-{request.param}")
    env = {"CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": "0.02", "CHATBOT_FEEDBACK_DIR": str(folder)}
    if request.param == "spaces":  # what Hugging Face sets: Gradio then believes it runs on a Space
        env.update(SYSTEM="spaces", SPACE_ID="someone/chat")
    log = tmp_path_factory.mktemp("logs") / f"app-{request.param}.log"
    with live_app(env, log) as app:
        app.folder = folder
        yield app


def test_feedback_for_a_reply_never_streamed_is_refused_and_never_written(mock_app):
    """Issue item 1: a POST wrote an `up` record for "2+2=5" with no chat at all; 10 MiB records were accepted."""
    forged = [text_message("user", "What is 2+2?"), text_message("assistant", "2+2=5")]
    like = {"index": 1, "value": ["2+2=5"], "liked": True}
    before = records(mock_app.folder)
    assert post_run(mock_app.url, "on_like", [forged], like).status_code == 200
    retried = post_run(mock_app.url, "on_retry", [forged], {"index": 0, "value": "What is 2+2?"})
    assert records(mock_app.folder) == before
    assert retried.status_code == 200 and "not saved" in retried.json()["data"][0]
    huge = [text_message("user", "x" * (10 * MIB)), text_message("assistant", "y")]
    for _ in range(3):  # the issue sent 10 of them: 105 MB on disk in 2.3 s
        post_run(mock_app.url, "on_like", [huge], {"index": 1, "value": ["y"], "liked": False})
        post_run(mock_app.url, "on_retry", [huge], {"index": 0, "value": "x"})
    assert records(mock_app.folder) == before
    assert "events refused so far" in mock_app.output()  # counted, in the log, without their text
    assert "2+2=5" not in mock_app.output()


def test_a_genuine_rating_is_written_once_and_only_its_session_can_take_it_back(mock_app):
    c = client(mock_app)
    reply, _ = c.predict("What is 2+2?", "Answer in one line.", 0.4, 0.9, 40, api_name="/chat")
    history = [text_message("user", "What is 2+2?"), text_message("assistant", reply)]
    before = len(records(mock_app.folder))
    post_run(mock_app.url, "on_like", [history], {"index": 1, "value": [reply], "liked": True}, c.session_hash)
    post_run(mock_app.url, "on_like", [history], {"index": 1, "value": [reply], "liked": None})  # another session
    written = records(mock_app.folder)[before:]
    assert [(r["rating"], r["reply"]) for r in written] == [("up", reply)]
    assert written[0]["messages"][0] == {"role": "system", "content": "Answer in one line."}
    assert written[0]["sampling"]["temperature"] == 0.4 and isinstance(written[0]["sampling"]["seed"], int)


def test_no_caller_skips_the_queue(mock_app):
    """Issue item 4: 50 concurrent POST /gradio_api/run/chat were all accepted, past max_size and
    concurrency_limit."""
    def direct(i: int) -> int:
        return httpx.post(f"{mock_app.url}gradio_api/run/chat", timeout=120,
                          json={"data": [f"flood {i}", None, "s", 0.2, 0.9, 8, 1.2, 0.05]}).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(direct, range(50)))
    assert codes.count(200) == 0 and set(codes) == {404}
    reply, _ = client(mock_app).predict("Still there?", api_name="/chat")  # the queue serves as before
    assert "You said: Still there?" in reply


@pytest.mark.parametrize("position, label", [(3, "Temperature"), (4, "Top-p"), (5, "Max new tokens"),
                                             (6, "Repetition penalty"), (7, "Min-p")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_settings_get_a_notice_naming_the_setting(mock_app, position, label, value):
    """Issue item 5: min(max(nan, 0), 2) is nan; llama.cpp ran with it, NaN max tokens gave a bare "Error"."""
    data = ["Hello", None, "Be brief.", 0.2, 0.9, 32, 1.2, 0.05]
    data[position] = value
    reply, *_ = final_output(join_queue(mock_app.url, "chat", data))
    assert reply.startswith("⚠️") and f"{label}={value!r} is not valid; accepted: a number from" in reply


def test_the_server_log_does_not_quote_what_visitors_send(mock_app):
    canary = f"private-{uuid.uuid4().hex}"
    join_queue(mock_app.url, "chat", [canary, None, canary, canary, 0.9, 32, 1.2, 0.05])  # text in a slider
    malformed = [{"role": "user", "content": canary}, {"role": "assistant", "content": 5}]
    post_run(mock_app.url, "on_like", [malformed], {"index": 1, "value": [canary], "liked": True})
    post_run(mock_app.url, "lambda", [malformed])  # the chat's own state sync: Gradio's validation error
    time.sleep(0.5)
    output = mock_app.output()
    assert "Traceback" in output  # Gradio did report the bad requests...
    assert canary not in output   # ...without what was in them


def test_sigterm_pushes_pending_feedback_within_a_bounded_wait(tmp_path):
    """Issue item 6: SIGTERM skipped CommitScheduler's last push; a dataset without a folder shared one temp folder
    between processes."""
    remote = tmp_path / "hub"
    env = {"CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": "0", "CHATBOT_FEEDBACK_DATASET": "me/feedback",
           "HF_HUB_OFFLINE": "0"}  # no CHATBOT_FEEDBACK_DIR: a folder of the process's own
    with live_app(env, tmp_path / "app.log", ["tests/app_with_local_hub.py", str(remote)]) as app:
        c = client(app)
        reply, _ = c.predict("Remember me", api_name="/chat")
        history = [text_message("user", "Remember me"), text_message("assistant", reply)]
        post_run(app.url, "on_like", [history], {"index": 1, "value": [reply], "liked": True}, c.session_hash)
        started = time.monotonic()
        app.proc.send_signal(signal.SIGTERM)
        assert app.proc.wait(timeout=60) == 0
        print(f"SIGTERM to exit: {time.monotonic() - started:.1f} s")
    pushed = [json.loads(line) for f in (remote / "me/feedback" / "data").glob("*.jsonl")
              for line in f.read_text().splitlines()]
    assert [(r["rating"], r["reply"]) for r in pushed] == [("up", reply)]
    folder = next(line for line in app.output().splitlines() if line.startswith("Feedback records are in "))
    assert f"chatbot-feedback-{app.proc.pid}-" in folder and "pushed to me/feedback" in folder


# --- the embedded SmolLM2: behaviour that is the model's -------------------------------------------------------

@pytest.fixture(scope="module", params=["default", "serial"])
def model_app(request, tmp_path_factory):
    """The default app (llama_cpp, prompt cache on, CHATBOT_PARALLEL's batching), and the serial backend."""
    log = tmp_path_factory.mktemp("logs") / f"app-smollm2-{request.param}.log"
    env = {"CHATBOT_THREADS": "1", **({"CHATBOT_PARALLEL": "1"} if request.param == "serial" else {})}
    with live_app(env, log) as app:
        yield app


SAMPLED = ("", 1.0, 0.95, 24, 1.1, 0.0)  # the Settings panel: no system prompt, temperature 1, top-p, 24 tokens, ...


def test_retry_gives_a_fresh_sample_with_the_prompt_cache_on(model_app):
    """Issue item 2: with the cache on, load_state restored the cached seed: 4 retries at temperature 1.0 after
    another visitor's turn gave 1 distinct reply; two visitors with the same first message got the same reply."""
    tab, other = Tab(model_app.url), Tab(model_app.url)
    first, _ = tab.send("Write one sentence about the sea.", *SAMPLED)
    retries = []
    for i in range(4):
        other.send(f"Name a colour, number {i}.", "", 0.2, 0.9, 8)  # another visitor in between
        retries.append(tab.retry(*SAMPLED))
    print("retries:", retries)
    assert len({first, *retries}) >= 3
    strangers = {Tab(model_app.url).send("Write one sentence about the sea.", *SAMPLED)[0] for _ in range(3)}
    assert len(strangers | {first}) >= 3


def test_an_oversized_system_prompt_is_refused_before_the_model(model_app):
    """Issue item 3: "hi" with an 8 MB system prompt took 14 s to be refused ("Your message is too long") and held
    the model lock: another visitor who asked 0.5 s later waited 13.7 s for a first token."""
    timings = {}

    def stranger():
        started = time.perf_counter()
        reply, _ = client(model_app).predict("hi", "x" * (8 * MIB), api_name="/chat")
        timings["refused after"] = time.perf_counter() - started
        timings["reply"] = reply

    attack = threading.Thread(target=stranger)
    attack.start()
    time.sleep(0.5)
    messages = join_queue(model_app.url, "chat", ["What is the capital of France?", None, "", 0.2, 0.9, 16, 1.2, 0.05])
    attack.join()
    print(f"8 MB system prompt refused after {timings['refused after']:.2f} s; the other visitor's first "
          f"token after {first_text_seconds(messages):.2f} s")
    assert "The system prompt is 8388608 characters long; the limit is 8000 (CHATBOT_MAX_SYSTEM_CHARS)" \
        in timings["reply"]


def test_an_oversized_history_is_cut_before_it_is_tokenised(model_app):
    """The history a caller sets is bounded too: the oldest turns beyond CHATBOT_MAX_HISTORY_CHARS are left out
    without tokenising them (the stats line says so) and the newest message is answered."""
    tab = Tab(model_app.url)
    tab.set_history([text_message("user", "w " * (4 * MIB)), text_message("assistant", "ok"),
                     text_message("user", "Say hello."), text_message("assistant", "Hello!")])
    started = time.perf_counter()
    reply, stats = tab.send("Thanks!", "", 0.2, 0.9, 8)
    print(f"8 MB history answered after {time.perf_counter() - started:.2f} s: {stats}")
    assert reply.strip() and not reply.startswith("⚠️")
    assert "2 oldest messages over CHATBOT_MAX_HISTORY_CHARS left out" in stats
