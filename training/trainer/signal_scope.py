"""A function that leaves the process's SIGTERM / SIGINT handlers as it found them, however it ends.

finetune.run handles both signals for the whole run, training and the outputs after it
(training.trainer.preemption); in-process callers (tests, notebooks, sweeps) get their own handlers back when it
returns or raises, so a later Ctrl-C or SIGTERM does what it did before.
"""
from __future__ import annotations

import functools
import signal
import threading

HANDLED = (signal.SIGTERM, signal.SIGINT)


def restoring_signal_handlers(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
            return fn(*args, **kwargs)
        saved = {sig: signal.getsignal(sig) for sig in HANDLED}
        try:
            return fn(*args, **kwargs)
        finally:
            for sig, handler in saved.items():
                if handler is not None:  # None: installed from C, cannot be put back from Python
                    signal.signal(sig, handler)

    return wrapper
