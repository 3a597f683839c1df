"""Save a checkpoint before the machine goes away: on SIGTERM / SIGINT, and every `train.save_minutes`.

Spot instances get SIGTERM shortly before they are reclaimed; Ctrl-C sends SIGINT. On the first signal the
current optimizer step finishes, a checkpoint of that step is saved (and pushed, when checkpoints are pushed),
and `exit_if_interrupted()` ends the process with status 128 + the signal number (143 for SIGTERM, 130 for
SIGINT: what a shell reports for a process killed by that signal, so supervisors see "killed", not "done").
A second signal exits at once. `--resume` then continues from that checkpoint.

`save_minutes` also checkpoints every N minutes of wall time, whichever of that and `train.save_steps` comes
first (both count from the last checkpoint), for machines whose step time is not known in advance.
Under DDP every rank takes the same decision (the flags are max-reduced each step), so all ranks save together.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

from transformers import TrainerCallback

HANDLED = (signal.SIGTERM, signal.SIGINT)


class SaveOnPreemption(TrainerCallback):
    """Trainer callback: a signal means save this step and stop; `save_minutes` means save this step."""

    def __init__(self, save_minutes: float | None = None, log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic):
        self.save_seconds = save_minutes * 60 if save_minutes else None
        self.log = log
        self.clock = clock
        self.signum: int | None = None          # the first signal received during training
        self.saved_step: int | None = None      # the checkpoint saved after it
        self._previous: dict[int, object] = {}
        self._last_save = clock()

    # ------------------------------------------------------------ signals

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            self.log(f"{name} again: exiting now without waiting for the checkpoint")
            os._exit(128 + signum)
        self.signum = signum
        self.log(f"{name} received: finishing this step, saving a checkpoint, then exiting "
                 f"(send {name} again to exit at once)")

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_save = self.clock()
        if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread
            self.log("not in the main thread: SIGTERM/SIGINT will not save a checkpoint")
            return
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    # ------------------------------------------------------------ decisions

    def _flags(self, args) -> tuple[bool, bool]:
        """(stop, save): this rank's view, made identical on all ranks under DDP."""
        stop = self.signum is not None
        due = self.save_seconds is not None and self.clock() - self._last_save >= self.save_seconds
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            flags = torch.tensor([float(stop), float(due)], device=args.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, due = bool(flags[0].item()), bool(flags[1].item())
        return stop, due

    def on_step_end(self, args, state, control, **kwargs):
        stop, due = self._flags(args)
        if stop:
            control.should_save = True
            control.should_training_stop = True
        elif due:
            control.should_save = True
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        # A signal during evaluation: the checkpoint of this step is written right after the evaluation.
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last_save = self.clock()
        if self.signum is not None:
            self.saved_step = state.global_step
            self.log(f"saved checkpoint-{state.global_step} after {signal.Signals(self.signum).name}")

    # ------------------------------------------------------------ after trainer.train()

    def exit_if_interrupted(self) -> None:
        """After trainer.train(): if a signal stopped it, the checkpoint is saved (and its push awaited): exit."""
        if self.signum is None:
            return
        name = signal.Signals(self.signum).name
        self.log(f"stopped by {name} at step {self.saved_step}; checkpoint-{self.saved_step} is saved. Continue with "
                 f"the same command plus --resume (exit status {128 + self.signum})")
        raise SystemExit(128 + self.signum)
