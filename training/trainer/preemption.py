"""Save a checkpoint before the machine goes away: on SIGTERM / SIGINT, and every `train.save_minutes`.

Spot instances get SIGTERM shortly before they are reclaimed (`train.preemption_notice_s`: 30 s on GCP and Azure,
120 s on AWS); Ctrl-C sends SIGINT. On the first signal:

- during an optimizer step: the step finishes, a checkpoint of it is saved;
- during an evaluation: the evaluation stops after the batch it is in (its figure is dropped) and the checkpoint of
  the step it evaluated is saved - an evaluation can take minutes, more than the notice;
- then the push of that checkpoint (`--push-checkpoints`) is awaited only for what is left of the notice, and
  `exit_if_interrupted()` ends the process with status 128 + the signal number (143 for SIGTERM, 130 for SIGINT:
  what a shell reports for a process killed by that signal, so supervisors see "killed", not "done");
- after training, while the adapter, merged model, GGUF files and upload are written: the output being written is
  finished (the merge writes beside merged/ and swaps it in, so no partial merged/ is ever left) and the run stops
  before the next one; the final checkpoint holds the trained model and `--resume` writes the rest.

A second signal exits at once. `--resume` then continues from the checkpoint. The signal handler only records the
signal (printing from a handler can re-enter a print the program is in: "reentrant call"); the callbacks log it.

`save_minutes` also checkpoints every N minutes of wall time, whichever of that and `train.save_steps` comes
first (both count from the last checkpoint), for machines whose step time is not known in advance.
Under DDP every rank takes the same decision: the signal and the save-due flag are max-reduced across ranks at every
step end and every evaluation batch, so all ranks stop the same evaluation at the same batch and save together, even
when only one of them was signalled.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

from transformers import TrainerCallback

from training.trainer.signal_scope import HANDLED

EXIT_MARGIN_S = 5.0  # of the notice, kept for writing the last lines and exiting


class EvaluationStopped(Exception):
    """Raised by SaveOnPreemption between two evaluation batches; the evaluation `attach` wraps returns {}."""


class SaveOnPreemption(TrainerCallback):
    """Trainer callback: a signal means save this step and stop; `save_minutes` means save this step.
    `attach(trainer)` lets a signal stop an evaluation; `release()` puts the previous signal handlers back."""

    def __init__(self, save_minutes: float | None = None, log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic, notice_s: float = 30.0):
        self.save_seconds = save_minutes * 60 if save_minutes else None
        self.log = log
        self.clock = clock
        self.notice_s = notice_s
        self.signum: int | None = None          # the first signal received (on any rank, under DDP)
        self.signalled_at: float | None = None  # when this process received it
        self.saved_step: int | None = None      # the checkpoint saved after it
        self.trained_step: int | None = None    # the last step, once training ended
        self.pushers: list = []                 # CheckpointPusher callbacks, whose final wait the notice bounds
        self._told = False
        self._previous: dict[int, object] = {}
        self._last_save = clock()

    # ------------------------------------------------------------ signals

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os.write(2, f"{signal.Signals(signum).name} again: exiting now\n".encode())  # no buffered I/O here
            os._exit(128 + signum)
        self.signum, self.signalled_at = signum, self.clock()

    def _tell(self, doing: str) -> None:
        """Log the signal once, outside the handler."""
        if self.signum is not None and not self._told:
            self._told = True
            name = signal.Signals(self.signum).name
            self.log(f"{name} received: {doing}, then exiting (send {name} again to exit at once)")

    def release(self) -> None:
        """The signal handlers from before on_train_begin, back (finetune.run does it however the run ends)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_save = self.clock()
        if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread
            self.log("not in the main thread: SIGTERM/SIGINT will not save a checkpoint")
            return
        for sig in HANDLED:
            self._previous.setdefault(sig, signal.signal(sig, self._handle))

    # ------------------------------------------------------------ decisions

    def _flags(self, args) -> tuple[bool, bool]:
        """(stop, save): this rank's view, made identical on all ranks under DDP (a rank that was not signalled
        takes the signal of the one that was)."""
        due = self.save_seconds is not None and self.clock() - self._last_save >= self.save_seconds
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            flags = torch.tensor([float(self.signum or 0), float(due)], device=args.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if self.signum is None and flags[0].item():
                self.signum = int(flags[0].item())
            due = bool(flags[1].item())
        return self.signum is not None, due

    def on_step_end(self, args, state, control, **kwargs):
        stop, due = self._flags(args)
        if stop:
            self._tell("finishing this step, saving a checkpoint")
            control.should_save = True
            control.should_training_stop = True
        elif due:
            control.should_save = True
        return control

    def on_prediction_step(self, args, state, control, **kwargs):
        stop, _ = self._flags(args)
        if not stop:
            return control
        control.should_evaluate = False  # as when an evaluation ends: none is run again at the epoch's end
        if self.trained_step is None:  # a periodic evaluation: save the step it evaluates, now
            self._tell(f"stopping the evaluation of step {state.global_step}, saving a checkpoint of that step")
            control.should_save = True
            control.should_training_stop = True
        raise EvaluationStopped  # after training: finetune stops at its next output

    def on_evaluate(self, args, state, control, **kwargs):
        stop, _ = self._flags(args)
        if stop:  # a signal during the last evaluation batch: the checkpoint of this step is written next
            self._tell("saving a checkpoint of this step")
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last_save = self.clock()
        if self.signum is not None:
            self.saved_step = state.global_step
            self.log(f"saved checkpoint-{state.global_step} after {signal.Signals(self.signum).name}")
            left = self.notice_s - (self.clock() - (self.signalled_at or self.clock())) - EXIT_MARGIN_S
            for pusher in self.pushers:  # their on_train_end waits for the push: no longer than the notice allows
                pusher.wait_s = min(pusher.wait_s, max(0.0, left))

    def on_train_end(self, args, state, control, **kwargs):
        self.trained_step = state.global_step

    # ------------------------------------------------------------ the trainer

    def attach(self, trainer) -> None:
        """Let a signal stop `trainer`'s evaluations between batches (Trainer otherwise runs them to the end): the
        interrupted evaluation returns no metrics, and Trainer goes on to save the checkpoint this callback asked
        for. Checkpoint pushers among its callbacks get their final wait bounded by the notice."""
        from training.export.hub import CheckpointPusher

        evaluate = trainer.evaluate

        def interruptible(*args, **kwargs):
            try:
                return evaluate(*args, **kwargs)
            except EvaluationStopped:
                return {}

        trainer.evaluate = interruptible
        self.pushers = [c for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointPusher)]

    # ------------------------------------------------------------ after trainer.train()

    def exit_if_interrupted(self) -> None:
        """After trainer.train(), and between the outputs written after it: if a signal came, exit 128 + signum
        (the checkpoint is saved and its push awaited within the notice)."""
        if self.signum is None:
            return
        name, code = signal.Signals(self.signum).name, 128 + self.signum
        self.release()
        if self.saved_step is not None:
            self.log(f"stopped by {name} at step {self.saved_step}; checkpoint-{self.saved_step} is saved. Continue "
                     f"with the same command plus --resume (exit status {code})")
        else:
            self.log(f"stopped by {name} after training, while writing the outputs; checkpoint-{self.trained_step} "
                     f"holds the trained model: the same command plus --resume writes them (exit status {code})")
        raise SystemExit(code)
