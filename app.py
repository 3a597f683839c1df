"""The Space's entry point: `python app.py` (Hugging Face Spaces runs the same file).

settings → backend (the model loads once, before the first request) → Gradio app → launch.
A configuration the user must fix prints one line to stderr and exits 2, without a traceback.
SIGTERM (what a Space restart sends) and SIGINT close the server, then push pending feedback records (at most
feedback.EXIT_PUSH_SECONDS) before the process exits.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from chatbot.settings import ConfigError, load_settings


def server_address(env=os.environ) -> tuple[str, int]:
    """GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else 0.0.0.0 on Spaces (SYSTEM=spaces) or 127.0.0.1, port 7860."""
    name = env.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if env.get("SYSTEM") == "spaces" else "127.0.0.1")
    raw = env.get("GRADIO_SERVER_PORT") or "7860"
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"GRADIO_SERVER_PORT={raw!r} is not valid; accepted: a port number 1-65535")
    return name, int(raw)


def stop_feedback(log) -> bool:
    """The last push of pending feedback records, waiting at most feedback.EXIT_PUSH_SECONDS; False if unfinished."""
    pushed = log.close()
    print(f"Feedback records are in {log.folder}" + (f", pushed to {log.dataset}" if log.dataset and pushed else ""),
          file=sys.stderr)
    return pushed


def main() -> int:
    try:
        settings = load_settings()
        host, port = server_address()
        # Imported after validation so a bad setting fails in well under a second.
        from chatbot.backends import load_arena_backend, load_backend
        backend = load_backend(settings)
        arena_backend = load_arena_backend(settings)  # CHATBOT_ARENA_MODEL's, or None: no Arena
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    from chatbot import feedback, log_privacy
    from chatbot.ui import build_app

    log_privacy.install()  # Gradio's error tracebacks would quote what visitors sent

    print(f"Serving {backend.model_name} with {backend.name} (context {backend.n_ctx}, "
          f"{settings.threads} threads) on http://{host}:{port}", file=sys.stderr)
    if arena_backend is not None:
        print(f"Arena: {backend.model_name} against {arena_backend.model_name}", file=sys.stderr)
    try:
        log = feedback.open_log(settings)
        demo = build_app(settings, backend, log, arena_backend)
    except ConfigError as exc:  # e.g. a CHATBOT_FEEDBACK_DATASET the token cannot create or write
        print(str(exc), file=sys.stderr)
        return 2
    # SIGTERM (a Space restart) as SIGINT: both end the wait below, so the feedback push runs before the exit.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        demo.launch(server_name=host, server_port=port, prevent_thread_lock=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("Stopping: closing the server" + (", pushing feedback" if log is not None and log.dataset else ""),
              file=sys.stderr)
    finally:
        if log is not None:
            log.push_soon()  # pushing while the server closes
        demo.close(verbose=False)
        if log is not None and not stop_feedback(log):
            sys.stderr.flush()
            os._exit(0)  # the unfinished push would hold the exit; the records stay in the folder
    return 0


if __name__ == "__main__":
    sys.exit(main())
