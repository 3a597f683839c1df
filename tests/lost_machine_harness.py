"""A stand-in for the Hub and for a machine that can be lost, for tests (no network).

`StandinHub(root).install(setattr)` replaces the huggingface_hub.HfApi calls that training/ makes
(create_repo, list_repo_files, create_commit, snapshot_download) with ones reading and writing `root/<repo_id>/`;
every commit is appended to `root/commits.jsonl` once it is complete. `commit_seconds` slows each commit down and
`fail_commits` makes the next N commits raise, as a flaky network would.

As a script it runs another script under that stand-in (settings from the environment), with each optimizer
step taking at least HARNESS_STEP_SECONDS and printing `[harness] step`, and each evaluation batch at least
HARNESS_EVAL_SECONDS, printing `[harness] eval batch rank R step N`, so a test can signal or kill it mid-run. Under
torchrun each process first prints `[harness] rank R pid P`, so a test can signal one of them:

    HUB_STANDIN_DIR=/tmp/hub HARNESS_STEP_SECONDS=0.2 python tests/lost_machine_harness.py training/finetune.py ...

In-process, `signal_at(step)` is a Trainer callback that sends this process SIGTERM when that optimizer step ends:
finetune.run then saves that step and raises SystemExit(143), as a spot instance's notice would make it.
"""
from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import sys
import threading
import time
from pathlib import Path


class StandinHub:
    def __init__(self, root: str | Path, commit_seconds: float = 0.0, fail_commits: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.commit_seconds = commit_seconds
        self.fail_commits = fail_commits
        self._lock = threading.Lock()

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    def commits(self) -> list[dict]:
        log = self.root / "commits.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []

    def files(self, repo_id: str) -> list[str]:
        repo = self.repo(repo_id)
        return sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())

    # ------------------------------------------------------------ the HfApi methods

    def create_repo(self, api, repo_id, *, private=False, exist_ok=False, **kwargs):
        self.repo(repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return f"https://huggingface.co/{repo_id}"

    def list_repo_files(self, api, repo_id, **kwargs):
        if not self.repo(repo_id).is_dir():
            import httpx2
            from huggingface_hub.errors import RepositoryNotFoundError

            request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
            raise RepositoryNotFoundError(f"404: {repo_id} not found", response=httpx2.Response(404, request=request))
        return self.files(repo_id)

    def create_commit(self, api, repo_id, operations, *, commit_message, **kwargs):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        time.sleep(self.commit_seconds)
        with self._lock:
            if self.fail_commits > 0:
                self.fail_commits -= 1
                raise OSError("stand-in network failure")
            repo = self.repo(repo_id)
            added, deleted = [], []
            for op in operations:
                target = repo / op.path_in_repo
                if isinstance(op, CommitOperationDelete):
                    shutil.rmtree(target, ignore_errors=True) if op.is_folder else target.unlink(missing_ok=True)
                    deleted.append(op.path_in_repo)
                elif isinstance(op, CommitOperationAdd):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(op.path_or_fileobj, target)
                    added.append(op.path_in_repo)
            with (self.root / "commits.jsonl").open("a") as f:
                f.write(json.dumps({"repo": repo_id, "message": commit_message, "added": added,
                                    "deleted": deleted}) + "\n")

    def snapshot_download(self, api, repo_id, *, allow_patterns=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        snapshot = self.root / "_cache" / repo_id
        for rel in filter_repo_objects(self.files(repo_id), allow_patterns=allow_patterns,
                                       ignore_patterns=ignore_patterns):
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.repo(repo_id) / rel, snapshot / rel)
        return str(snapshot)

    def install(self, set_attr=setattr) -> "StandinHub":
        """Patch huggingface_hub.HfApi (pass pytest's monkeypatch.setattr to have it undone after a test)."""
        from huggingface_hub import HfApi

        for name in ("create_repo", "list_repo_files", "create_commit", "snapshot_download"):
            method = getattr(self, name)
            set_attr(HfApi, name, lambda api, *a, _m=method, **k: _m(api, *a, **k))
        return self


def signal_at(step: int, event: str = "on_step_end", signum: int = 15):
    """A Trainer callback that sends this process `signum` (SIGTERM) once, at `event` of optimizer step `step`."""
    from transformers import TrainerCallback

    def fire(self, args, state, control, **kwargs):
        if state.global_step >= step and not self.fired:
            self.fired = True
            signal.raise_signal(signum)  # to this thread, as a process signal would reach the main thread

    return type("SignalAt", (TrainerCallback,), {event: fire, "fired": False})()


def _slow_steps(seconds: float) -> None:
    from transformers import Trainer

    step = Trainer.training_step

    def slow_step(self, *args, **kwargs):
        time.sleep(seconds)
        print("[harness] step", flush=True)
        return step(self, *args, **kwargs)

    Trainer.training_step = slow_step


def _slow_eval_batches(seconds: float) -> None:
    from transformers.trainer_callback import CallbackHandler

    event = CallbackHandler.on_prediction_step

    def slow_batch(self, args, state, control):
        time.sleep(seconds)
        print(f"[harness] eval batch rank {os.environ.get('RANK', '0')} step {state.global_step}", flush=True)
        return event(self, args, state, control)

    CallbackHandler.on_prediction_step = slow_batch


if __name__ == "__main__":
    StandinHub(os.environ["HUB_STANDIN_DIR"]).install()
    _slow_steps(float(os.environ.get("HARNESS_STEP_SECONDS", "0")))
    if float(os.environ.get("HARNESS_EVAL_SECONDS", "0")) > 0:
        _slow_eval_batches(float(os.environ["HARNESS_EVAL_SECONDS"]))
    if "RANK" in os.environ:
        print(f"[harness] rank {os.environ['RANK']} pid {os.getpid()}", flush=True)
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
