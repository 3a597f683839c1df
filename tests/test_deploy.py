"""The deploy helper, without network: what it selects, what --dry-run prints, and the HfApi calls it makes.

Only the network object is replaced (a recorder whose calls are bound against HfApi's real signatures);
the planning and file selection are the real code.
"""
from __future__ import annotations

import ast
import inspect
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from tools import deploy_space as deploy

ROOT = Path(__file__).resolve().parent.parent

# A repository tree as a user would have it after training and testing: what must go up, and what must not.
APP = [
    ".gitattributes",
    "README.md",
    "app.py",
    "chatbot/__init__.py",
    "chatbot/backends/__init__.py",
    "chatbot/backends/mock.py",
    "chatbot/ui.py",
    "docs/serving.md",  # the README's links point into docs/
    "requirements.txt",
]
NOT_APP = [
    ".git/config",
    ".git/objects/ab/cdef",
    ".cache/huggingface/download/x.lock",
    "chatbot/__pycache__/ui.cpython-311.pyc",
    "chatbot/local-model.gguf",
    "training/train.py",
    "training/__pycache__/train.cpython-311.pyc",
    "runs/smollm2-lora/adapter_model.safetensors",
    "runs/smollm2-lora/checkpoint-10/optimizer.pt",
    "outputs/model-Q4_K_M.gguf",
    "tests/test_app.py",
    "test-artifacts/chat.png",
    "bench-results/app.json",
    "wandb/run-1/files/output.log",
    "requirements-dev.txt",
    "notes.txt",
    "docs/screenshot.png",
]


@pytest.fixture
def tree(tmp_path):
    for rel in APP + NOT_APP:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("---\ntitle: t\n---\n" if rel == "README.md" else f"# {rel}\n")
    return tmp_path


class FakeHub:
    """Records HfApi calls; each is bound against the real method's signature so a wrong keyword fails here."""

    def __init__(self, existing_variables=(), repo_files=(), list_error: Exception | None = None):
        self.calls: list[tuple[str, inspect.BoundArguments]] = []
        self.existing_variables = {key: object() for key in existing_variables}
        self.repo_files = list(repo_files)
        self.list_error = list_error
        self.uploaded: dict[str, str] = {}  # what upload_folder found in its folder, read while the call ran

    def __getattr__(self, name):
        real = getattr(HfApi, name)

        def record(*args, **kwargs):
            bound = inspect.signature(real).bind(self, *args, **kwargs)
            bound.apply_defaults()
            self.calls.append((name, bound.arguments))
            if name == "get_space_variables":
                return dict(self.existing_variables)
            if name == "create_repo":
                return f"https://huggingface.co/spaces/{bound.arguments['repo_id']}"
            if name == "list_repo_files":
                if self.list_error is not None:
                    raise self.list_error
                return list(self.repo_files)
            if name == "upload_folder":
                folder = Path(bound.arguments["folder_path"])
                self.uploaded = {f.relative_to(folder).as_posix(): f.read_text() for f in folder.rglob("*")
                                 if f.is_file()}
            return None

        return record

    def names(self):
        return [name for name, _ in self.calls]

    def args(self, name):
        return [a for n, a in self.calls if n == name]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_selection_takes_the_app_and_nothing_else(tree):
    assert deploy.select_files(tree) == sorted(APP)


def test_selection_of_this_repository_is_the_app_only():
    files = deploy.select_files(ROOT)
    for needed in ("app.py", "README.md", "requirements.txt", ".gitattributes"):
        assert needed in files
    # The upload follows the served package: every module in chatbot/ goes up, and the deploy helper does not.
    served = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "chatbot").rglob("*.py"))
    assert "chatbot/__init__.py" in served and "chatbot/backends/llama_cpp.py" in served
    assert [f for f in files if f.startswith("chatbot/") and f.endswith(".py")] == served
    assert Path(deploy.__file__).resolve().relative_to(ROOT).as_posix() not in files
    assert not [f for f in files if f.split("/")[0] in {"tests", "training", "benchmarks", "tools", ".ci", ".git"}]
    assert not [f for f in files if "__pycache__" in f or f.endswith((".gguf", ".safetensors", ".pyc"))]
    # The README links into docs/: its pages go up with it, so the links work on the Space.
    assert [f for f in files if f.startswith("docs/")] == sorted(p.relative_to(ROOT).as_posix()
                                                                for p in (ROOT / "docs").glob("*.md"))


def _local_imports(py: Path, top_levels: set[str]) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & top_levels


def test_uploaded_code_imports_only_uploaded_code():
    """The Space gets the allowlist only: an app module importing training/ or tests/ would crash there."""
    files = deploy.select_files(ROOT)
    top_levels = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    uploaded_tops = {f.split("/")[0].removesuffix(".py") for f in files}
    for f in files:
        if f.endswith(".py"):
            missing = _local_imports(ROOT / f, top_levels) - uploaded_tops
            assert not missing, f"{f} imports {sorted(missing)}, which the Space does not get"


def test_dry_run_prints_files_variables_and_secrets_without_network(tree, no_network, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setattr(deploy, "deploy", lambda *a, **k: pytest.fail("dry run deployed"))
    rc = deploy.main([
        "--space", "alice/chat", "--model", "bob/SmolLM2-ft-GGUF", "--gguf-file", "*Q4_K_M.gguf",
        "--private-model", "--set", "CHATBOT_SYSTEM_PROMPT=Be brief.", "--folder", str(tree), "--dry-run",
    ])
    out = capsys.readouterr().out
    assert rc == 0
    listed = [line[2:] for line in out.splitlines() if line.startswith("  ") and "=" not in line]
    assert listed == sorted(APP)
    assert "  CHATBOT_MODEL=bob/SmolLM2-ft-GGUF" in out.splitlines()
    assert "  CHATBOT_GGUF_FILE=*Q4_K_M.gguf" in out.splitlines()
    assert "  CHATBOT_SYSTEM_PROMPT=Be brief." in out.splitlines()
    assert "HF_TOKEN" in out and "hf_secret_value_123" not in out
    assert "https://huggingface.co/spaces/alice/chat" in out


def test_dry_run_as_a_command(tree):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "deploy_space.py"), "--space", "alice/chat", "--folder", str(tree),
         "--dry-run"],
        cwd=tree, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for rel in APP:
        assert f"  {rel}\n" in proc.stdout
    for rel in NOT_APP:
        assert rel not in proc.stdout
    assert "serves the embedded default model" in proc.stdout


def test_deploy_calls_hfapi_in_order_with_the_planned_files(tree, no_network, no_token, capsys):
    hub = FakeHub(existing_variables=["CHATBOT_GGUF_FILE", "CHATBOT_ADAPTER", "SOMETHING_ELSE"])
    rc = deploy.main(["--space", "alice/chat", "--model", "bob/m-GGUF", "--folder", str(tree)], api=hub)
    assert rc == 0
    assert hub.names() == [
        "create_repo",
        "get_space_variables",
        "delete_space_variable",
        "delete_space_variable",
        "add_space_variable",
        "upload_folder",
    ]
    (create,) = hub.args("create_repo")
    assert create["repo_id"] == "alice/chat" and create["repo_type"] == "space"
    assert create["space_sdk"] == "gradio" and create["exist_ok"] is True
    assert create["space_hardware"] == "cpu-basic"
    # Stale CHATBOT_* variables from an earlier deploy go; the user's other variables stay.
    assert sorted(a["key"] for a in hub.args("delete_space_variable")) == ["CHATBOT_ADAPTER", "CHATBOT_GGUF_FILE"]
    assert [(a["key"], a["value"]) for a in hub.args("add_space_variable")] == [("CHATBOT_MODEL", "bob/m-GGUF")]

    (upload,) = hub.args("upload_folder")
    assert upload["repo_id"] == "alice/chat" and upload["repo_type"] == "space"
    assert Path(upload["folder_path"]) == tree.resolve()
    # What upload_folder will pick with these patterns (its own filter, plus the defaults it always adds).
    all_files = sorted(p.relative_to(tree).as_posix() for p in tree.glob("**/*") if p.is_file())
    picked = filter_repo_objects(
        all_files,
        allow_patterns=upload["allow_patterns"],
        ignore_patterns=list(upload["ignore_patterns"]) + DEFAULT_IGNORE_PATTERNS,
    )
    assert sorted(picked) == sorted(APP)
    # A delete pattern must never reach outside the app (it would wipe files pushed the git way).
    outside_app = [p for p in NOT_APP if not p.startswith("chatbot/")]
    assert not list(filter_repo_objects(outside_app, allow_patterns=upload["delete_patterns"]))
    assert capsys.readouterr().out.strip().endswith("https://huggingface.co/spaces/alice/chat")



def test_private_model_adds_the_token_as_a_secret(tree, no_network, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_private_abc")
    hub = FakeHub()
    assert deploy.main(["--space", "alice/chat", "--model", "bob/private-GGUF", "--private-model",
                        "--folder", str(tree)], api=hub) == 0
    (secret,) = hub.args("add_space_secret")
    assert (secret["repo_id"], secret["key"], secret["value"]) == ("alice/chat", "HF_TOKEN", "hf_private_abc")
    assert hub.names().index("add_space_secret") < hub.names().index("upload_folder")


def test_public_model_adds_no_secret_even_with_a_token(tree, no_network, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_private_abc")
    hub = FakeHub()
    assert deploy.main(["--space", "alice/chat", "--model", "bob/public-GGUF", "--folder", str(tree)], api=hub) == 0
    assert "add_space_secret" not in hub.names()


def test_hardware_is_requested_only_when_asked(tree, no_network, no_token):
    hub = FakeHub()
    assert deploy.main(["--space", "alice/chat", "--hardware", "cpu-upgrade", "--folder", str(tree)], api=hub) == 0
    assert [a["hardware"] for a in hub.args("request_space_hardware")] == ["cpu-upgrade"]
    assert hub.args("create_repo")[0]["space_hardware"] == "cpu-upgrade"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--space", "just-a-name"], "--space"),
        (["--space", "a/b/c"], "--space"),
        (["--space", "alice/chat", "--gguf-file", "*.gguf"], "--gguf-file"),
        (["--space", "alice/chat", "--model", "bob/m", "--gguf-file", " "], "--gguf-file"),
        (["--space", "alice/chat", "--model", "LOCAL_DIR"], "--model"),
        (["--space", "alice/chat", "--model", "not a repo"], "--model"),
        (["--space", "alice/chat", "--hardware", "quantum-9000"], "--hardware"),
        (["--space", "alice/chat", "--set", "OPENAI_API_KEY=x"], "--set"),
        (["--space", "alice/chat", "--set", "CHATBOT_MAX_NEW_TOKENS"], "--set"),
        (["--space", "alice/chat", "--set", "chatbot_lower=1"], "--set"),
        (["--space", "alice/chat", "--set", "CHATBOT_MODEL=bob/m"], "--set"),
        (["--space", "alice/chat", "--set", "CHATBOT_MAX_NEW_TOKENS=lots"], "CHATBOT_MAX_NEW_TOKENS"),
        (["--space", "alice/chat", "--set", "CHATBOT_BACKEND=vllm"], "CHATBOT_BACKEND"),
        (["--space", "alice/chat", "--private-model"], "--private-model"),
        (["--space", "alice/chat", "--model", "bob/m", "--private-model"], "--private-model"),
        # ZeroGPU: what cannot run there
        (["--space", "alice/chat", "--hardware", "zero-a10g", "--set", "CHATBOT_BACKEND=llama_cpp"],
         "CHATBOT_BACKEND='llama_cpp' is not valid on ZeroGPU"),
        (["--space", "alice/chat", "--hardware", "zero-a10g", "--set", "CHATBOT_BACKEND=llama-cpp"],
         "CHATBOT_BACKEND='llama_cpp' is not valid on ZeroGPU"),
        (["--space", "alice/chat", "--hardware", "zero-a10g", "--model", "bob/m", "--gguf-file", "*Q4_K_M.gguf"],
         "--gguf-file '*Q4_K_M.gguf' is not valid on ZeroGPU"),
        (["--space", "alice/chat", "--hardware", "zero-a10g", "--model", "bob/SmolLM2-ft-GGUF"],
         "--model 'bob/SmolLM2-ft-GGUF' is not valid on ZeroGPU"),
        (["--space", "alice/chat", "--hardware", "zero-a10g", "--set", "CHATBOT_DEVICE=cpu"],
         "CHATBOT_DEVICE='cpu' is not valid on ZeroGPU"),
        (["--space", "alice/chat", "--set", "CHATBOT_BACKEND=transformers", "--set", "CHATBOT_DEVICE=cuda"],
         "CHATBOT_DEVICE=cuda, but hardware cpu-basic has no GPU"),
    ],
)
def test_bad_options_fail_with_one_line_naming_the_option(tree, no_network, no_token, capsys, argv, named):
    argv = [str(tree) if a == "LOCAL_DIR" else a for a in argv]
    hub = FakeHub()
    assert deploy.main([*argv, "--folder", str(tree)], api=hub) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert hub.calls == []


# --- ZeroGPU ---------------------------------------------------------------------------------------------------------

MERGED_REPO = ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "model-q4_k_m.gguf", "adapter/adapter_model.safetensors", "run/summary.json"]


@pytest.fixture
def zerogpu_tree(tree):
    shutil.copy(ROOT / "requirements-zerogpu.txt", tree / "requirements-zerogpu.txt")
    return tree


def test_zerogpu_dry_run_prints_files_requirements_and_variables(zerogpu_tree, no_network, capsys):
    rc = deploy.main(["--space", "alice/chat", "--hardware", "zero-a10g", "--model", "alice/smollm2-ft",
                      "--folder", str(zerogpu_tree), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert "hardware zero-a10g = ZeroGPU" in lines[1]
    assert [line[2:] for line in lines if line.startswith("  ") and "=" not in line] == sorted(APP)
    # The exact text the Space installs: requirements-zerogpu.txt, line for line.
    shown = [line[2:] for line in lines if line.startswith("| ")]
    assert shown == (ROOT / "requirements-zerogpu.txt").read_text().rstrip("\n").splitlines()
    assert "requirements.txt on the Space (from requirements-zerogpu.txt):" in lines
    assert [line for line in lines if line.startswith("  CHATBOT_")] == [
        "  CHATBOT_BACKEND=transformers", "  CHATBOT_DEVICE=cuda", "  CHATBOT_MODEL=alice/smollm2-ft"]
    assert "warning" not in out


def test_cpu_dry_run_prints_the_folders_own_requirements(tree, capsys):
    assert deploy.main(["--space", "alice/chat", "--folder", str(tree), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "requirements.txt on the Space (from requirements.txt):" in lines
    assert [line[2:] for line in lines if line.startswith("| ")] == ["# requirements.txt"]


def test_zerogpu_requirements_serve_transformers_without_llama_cpp():
    text = (ROOT / "requirements-zerogpu.txt").read_text()
    pins = dict(line.split("==") for line in text.splitlines() if "==" in line and not line.startswith("#"))
    assert {"spaces", "torch", "transformers", "peft", "gradio"} <= set(pins)
    assert not [line for line in text.splitlines() if line.startswith("llama")]  # no llama-cpp-python build
    # The same versions the tests run: the Space's gradio SDK, the dev spaces pin, the CPU Space's commented pins.
    readme = (ROOT / "README.md").read_text()
    assert f"sdk_version: {pins['gradio']}\n" in readme
    assert f"spaces=={pins['spaces']}" in (ROOT / "requirements-dev.txt").read_text()
    cpu = (ROOT / "requirements.txt").read_text()
    for package in ("torch", "transformers", "peft"):
        assert f"{package}=={pins[package]}" in cpu


def test_zerogpu_deploy_checks_the_model_then_uploads_the_gpu_requirements(zerogpu_tree, no_network, no_token,
                                                                         capsys):
    hub = FakeHub(existing_variables=["CHATBOT_GGUF_FILE"], repo_files=MERGED_REPO)
    rc = deploy.main(["--space", "alice/chat", "--hardware", "zero-a10g", "--model", "alice/smollm2-ft",
                      "--folder", str(zerogpu_tree)], api=hub)
    assert rc == 0
    assert hub.names() == ["list_repo_files", "create_repo", "get_space_variables", "delete_space_variable",
                           "add_space_variable", "add_space_variable", "add_space_variable",
                           "request_space_hardware", "upload_folder"]
    assert hub.args("list_repo_files")[0]["repo_id"] == "alice/smollm2-ft"
    assert hub.args("create_repo")[0]["space_hardware"] == "zero-a10g"
    assert [a["hardware"] for a in hub.args("request_space_hardware")] == ["zero-a10g"]
    assert [(a["key"], a["value"]) for a in hub.args("add_space_variable")] == [
        ("CHATBOT_BACKEND", "transformers"), ("CHATBOT_DEVICE", "cuda"), ("CHATBOT_MODEL", "alice/smollm2-ft")]
    # One upload: the app's files, with the GPU requirements as the Space's requirements.txt.
    assert sorted(hub.uploaded) == sorted(APP)
    assert hub.uploaded["requirements.txt"] == (ROOT / "requirements-zerogpu.txt").read_text()
    assert hub.uploaded["app.py"] == (zerogpu_tree / "app.py").read_text()
    assert (zerogpu_tree / "requirements.txt").read_text() == "# requirements.txt\n"  # the checkout is untouched
    assert "torch installs on first build" in capsys.readouterr().out


@pytest.mark.parametrize(("files", "error", "named"), [
    (["README.md", "SmolLM2-ft-q4_k_m.gguf", "SmolLM2-ft-q8_0.gguf"], None, "GGUF files, no transformers weights"),
    (["README.md", "notes.txt"], None, "it has no config.json and weights at its root"),
    ([], "not found", "could not be listed on the Hub (RepositoryNotFoundError"),
])
def test_zerogpu_model_repo_that_cannot_serve_stops_before_any_write(zerogpu_tree, no_network, no_token, capsys,
                                                                     files, error, named):
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    failure = RepositoryNotFoundError("404 Client Error: Repository Not Found for url: https://huggingface.co/api/"
                                      "models/bob/gone", response=httpx2.Response(404, request=httpx2.Request(
                                          "GET", "https://huggingface.co/api/models/bob/gone"))) if error else None
    hub = FakeHub(repo_files=files, list_error=failure)
    assert deploy.main(["--space", "alice/chat", "--hardware", "zero-a10g", "--model", "bob/gone",
                        "--folder", str(zerogpu_tree)], api=hub) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "--model 'bob/gone'" in err, err
    assert hub.names() == ["list_repo_files"]


def test_zerogpu_dry_run_as_a_command_from_this_checkout():
    """The command the docs give, on this repository: the real requirements-zerogpu.txt and app files."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "deploy_space.py"), "--space", "alice/chat", "--hardware", "zero-a10g",
         "--model", "alice/smollm2-ft", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "  chatbot/zerogpu.py\n" in proc.stdout and "  chatbot/device.py\n" in proc.stdout
    assert "| spaces==" in proc.stdout and "| llama-cpp-python" not in proc.stdout


def test_folder_without_an_app_is_refused(tmp_path, capsys):
    assert deploy.main(["--space", "alice/chat", "--folder", str(tmp_path), "--dry-run"]) == 2
    assert "--folder" in capsys.readouterr().err


def test_transformers_backend_warns_when_requirements_lack_torch(tree, capsys):
    assert deploy.main(["--space", "a/b", "--set", "CHATBOT_BACKEND=transformers", "--folder", str(tree),
                        "--dry-run"]) == 0
    assert "warning: CHATBOT_BACKEND=transformers needs torch" in capsys.readouterr().out
    (tree / "requirements.txt").write_text("gradio==6.31.0\ntorch==2.13.0\n")
    assert deploy.main(["--space", "a/b", "--set", "CHATBOT_BACKEND=transformers", "--folder", str(tree),
                        "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().out


# --- what a plain `git push space main` sends ------------------------------------------------------------

def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def _in_git_checkout() -> bool:
    return shutil.which("git") is not None and _git("rev-parse", "--git-dir").returncode == 0


needs_git = pytest.mark.skipif(not _in_git_checkout(), reason="not a git checkout (these check what a git push sends)")


@needs_git
@pytest.mark.parametrize("path", ["model-Q4_K_M.gguf", "runs/x/adapter_model.safetensors", "pytorch_model.bin",
                                  "ckpt/optimizer.pt", "data/train.parquet", "docs/screenshot.png"])
def test_gitattributes_routes_binaries_through_lfs(path):
    assert _git("check-attr", "filter", "--", path).stdout.strip().endswith("filter: lfs")


@needs_git
@pytest.mark.parametrize("path", ["app.py", "README.md", "requirements.txt", "training/configs/tiny.yaml"])
def test_gitattributes_leaves_text_alone(path):
    assert _git("check-attr", "filter", "--", path).stdout.strip().endswith("filter: unspecified")


@needs_git
def test_every_tracked_binary_goes_through_lfs():
    """The Hub rejects a Space push that carries binaries outside LFS."""
    tracked = _git("ls-files", "-z").stdout.split("\0")
    binaries = [f for f in tracked if f and (ROOT / f).is_file() and b"\0" in (ROOT / f).read_bytes()[:8192]]
    plain = [f for f in binaries if not _git("check-attr", "filter", "--", f).stdout.strip().endswith("lfs")]
    assert not plain, f"binary files tracked outside LFS (add their extension to .gitattributes): {plain}"


@needs_git
@pytest.mark.parametrize("path", ["runs/smollm2/adapter_model.safetensors", "outputs/model.gguf",
                                  "test-artifacts/chat.png", "chatbot/__pycache__/ui.cpython-311.pyc",
                                  ".cache/huggingface/hub/x", "wandb/run-1/log.txt", "bench-results/a.json"])
def test_gitignore_keeps_outputs_and_caches_out_of_the_space(path):
    assert _git("check-ignore", "--no-index", "-q", path).returncode == 0, f"{path} would be pushed to the Space"
