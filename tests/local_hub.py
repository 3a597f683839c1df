"""A stand-in for the Hugging Face Hub: huggingface_hub's real CommitScheduler pushes to it, and it writes each commit
into a local folder instead of the network."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace


class LocalHub:
    """A stand-in for the Hub: huggingface_hub's real CommitScheduler talks to this HfApi, which writes commits into
    a local folder instead of the network."""

    def __new__(cls, remote: Path):
        from huggingface_hub import HfApi

        class Api(HfApi):
            def __init__(self):
                super().__init__(token="hf_fake")
                self.repos, self.commits = [], []

            def create_repo(self, repo_id, *, private=None, repo_type=None, exist_ok=False, **kwargs):
                self.repos.append({"repo_id": repo_id, "private": private, "repo_type": repo_type})
                return SimpleNamespace(repo_id=repo_id)

            def create_commit(self, repo_id, operations, *, commit_message="", repo_type=None, **kwargs):
                for op in operations:
                    target = remote / repo_id / op.path_in_repo
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(op.path_or_fileobj.read())
                self.commits.append({"repo_id": repo_id, "repo_type": repo_type,
                                     "files": [op.path_in_repo for op in operations]})
                return SimpleNamespace(oid=f"commit-{len(self.commits)}")

        return Api()
