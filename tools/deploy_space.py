"""Deploy this repository to a Hugging Face Space.

    python tools/deploy_space.py --space USER/NAME [--model REPO] [--gguf-file GLOB] [--private-model]
                                 [--set CHATBOT_X=VALUE ...] [--hardware cpu-basic] [--private] [--dry-run]

Creates the Space if missing (gradio SDK), makes its CHATBOT_* variables exactly the ones given here,
adds HF_TOKEN as a secret only for a private model, uploads the app (app.py, the whole chatbot/ package,
requirements.txt, README.md, ...) and prints the Space URL. This file lives outside chatbot/ so the Space never
gets it.
--hardware zero-a10g (ZeroGPU) serves --model, the merged repo `finetune.py --push-to-hub` wrote, with the
transformers backend on a borrowed GPU: requirements-zerogpu.txt goes up as the Space's requirements.txt and
CHATBOT_BACKEND=transformers, CHATBOT_DEVICE=cuda are set. What cannot run there (llama_cpp, a GGUF) stops here.
--dry-run prints the same plan (files, the exact requirements, variables, secrets) and touches no network.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import SpaceHardware
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from chatbot.settings import ConfigError, load_settings  # noqa: E402

# An allowlist rather than "everything but": the Space runs `python app.py` and installs requirements.txt,
# nothing more, so training code, tests, benchmarks and whatever a user leaves lying around stay home. The docs go
# up with the README so that its links work on the Space's page.
# (`*` crosses "/" in huggingface_hub's matching, so "chatbot/*" takes the whole package: the upload follows the
# folder, and whatever is added to chatbot/ goes up with it.)
APP_PATTERNS = [
    "app.py",
    "chatbot/*",
    "requirements.txt",
    "packages.txt",
    "README.md",
    "docs/*.md",
    ".gitattributes",
    "LICENSE",
]
# Caches and weights inside the allowlisted tree still never go up: the Space downloads the model from the Hub.
NEVER_UPLOAD = [
    "*__pycache__*",
    "*.pyc",
    "*.gguf",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.onnx",
    "*.npy",
    "*.npz",
    "*.pkl",
    "*/.ipynb_checkpoints/*",
    "*.log",
    *DEFAULT_IGNORE_PATTERNS,
]
VARIABLE_PREFIX = "CHATBOT_"
HARDWARE = [h.value for h in SpaceHardware]
ZEROGPU = SpaceHardware.ZERO_A10G.value  # the Hub's name for ZeroGPU (today an H200 slice, whatever it says)
CPU_HARDWARE = (SpaceHardware.CPU_BASIC.value, SpaceHardware.CPU_UPGRADE.value)
ZEROGPU_REQUIREMENTS = "requirements-zerogpu.txt"
ZEROGPU_VARIABLES = {"CHATBOT_BACKEND": "transformers", "CHATBOT_DEVICE": "cuda"}
HUB = "https://huggingface.co"


class DeployError(ValueError):
    """A user error: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Plan:
    space: str
    folder: Path
    files: list[str]
    variables: dict[str, str]
    requirements: str = ""                  # the exact text the Space installs as requirements.txt
    requirements_from: str = "requirements.txt"  # the file in `folder` it comes from
    secrets: list[str] = field(default_factory=list)
    hardware: str = "cpu-basic"
    request_hardware: bool = False  # only when asked: an existing Space keeps the hardware it was given
    private_space: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{HUB}/spaces/{self.space}"


def select_files(folder: Path) -> list[str]:
    """The repo-relative paths that go up, chosen the same way `upload_folder` chooses them."""
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    return list(filter_repo_objects(paths, allow_patterns=APP_PATTERNS, ignore_patterns=NEVER_UPLOAD))


def _repo_id(option: str, value: str, example: str) -> str:
    try:
        if value.count("/") != 1:
            raise ValueError("needs exactly one '/'")
        validate_repo_id(value)
    except ValueError as exc:
        raise DeployError(f"{option}: {value!r} is not a Hub id ({exc}); expected OWNER/NAME, e.g. {example}") from None
    return value


def _variable(assignment: str) -> tuple[str, str]:
    key, sep, value = assignment.partition("=")
    name = key[len(VARIABLE_PREFIX):]
    if not sep or not key.startswith(VARIABLE_PREFIX) or not name.replace("_", "").isalnum() or key != key.upper():
        raise DeployError(
            f"--set: {assignment!r} is not a Space variable assignment; expected {VARIABLE_PREFIX}NAME=VALUE, "
            f"e.g. {VARIABLE_PREFIX}SYSTEM_PROMPT='You are terse.'"
        )
    if key in ("CHATBOT_MODEL", "CHATBOT_GGUF_FILE"):
        raise DeployError(f"--set: {key} is set with --{key[8:].lower().replace('_', '-')}, not --set")
    return key, value


def _requirements_have(text: str, package: str) -> bool:
    return any(line.strip().lower().startswith(package) for line in text.splitlines())


def _read(folder: Path, name: str) -> str:
    path = folder / name
    if not path.is_file():
        raise DeployError(f"--folder: {str(folder)!r} has no {name}; pass the repository root")
    return path.read_text(encoding="utf-8")


def _zerogpu_checks(args: argparse.Namespace, variables: dict[str, str]) -> None:
    """What cannot run on ZeroGPU stops here, in one line each."""
    backend = variables.get("CHATBOT_BACKEND", "transformers").strip().lower().replace("-", "_")
    if backend != "transformers":
        raise DeployError(f"--hardware {ZEROGPU}: CHATBOT_BACKEND={backend!r} is not valid on ZeroGPU (llama.cpp is "
                          "CPU-only here; only the transformers backend uses its GPU); accepted: transformers, the "
                          "default with this hardware")
    if variables.get("CHATBOT_DEVICE", "cuda").strip().lower() == "cpu":
        raise DeployError(f"--hardware {ZEROGPU}: CHATBOT_DEVICE='cpu' is not valid on ZeroGPU (its GPU would go "
                          "unused); accepted: cuda, the default with this hardware, or auto")
    if args.gguf_file is not None:
        raise DeployError(f"--gguf-file {args.gguf_file!r} is not valid on ZeroGPU (a GGUF runs on llama.cpp, "
                          "CPU-only here); accepted: --model alone, the merged repo finetune.py --push-to-hub wrote")
    if args.model is not None and args.model.lower().endswith(("-gguf", ".gguf", "_gguf")):
        raise DeployError(f"--model {args.model!r} is not valid on ZeroGPU (a GGUF-only repo, by its name); "
                          "accepted: a transformers model repo, e.g. the one finetune.py --push-to-hub wrote "
                          "(merged safetensors at its root)")


def check_model_repo(plan: Plan, api, token: str | None) -> None:
    """ZeroGPU: the model repo must hold transformers weights at its root (one listing, read-only)."""
    model = plan.variables.get("CHATBOT_MODEL")
    if plan.hardware != ZEROGPU or model is None:
        return
    try:
        files = list(api.list_repo_files(model, revision=plan.variables.get("CHATBOT_REVISION"), token=token))
    except Exception as exc:  # not found, private without a token, no connection: all the user's to fix
        text = str(exc).strip().splitlines()
        raise DeployError(f"--model {model!r} could not be listed on the Hub ({type(exc).__name__}: "
                          f"{text[0] if text else ''}); accepted: a model repo id you can read (--private-model "
                          "for a private one)") from None
    weights = [f for f in files if "/" not in f and f.endswith((".safetensors", ".bin"))]
    if "config.json" in files and weights:
        return
    if any(f.endswith(".gguf") for f in files):
        raise DeployError(f"--model {model!r} is not valid on ZeroGPU (GGUF files, no transformers weights); "
                          "accepted: the repo finetune.py --push-to-hub wrote (merged safetensors at its root)")
    raise DeployError(f"--model {model!r} is not valid on ZeroGPU (it has no config.json and weights at its root); "
                      "accepted: a transformers causal LM repo, e.g. the one finetune.py --push-to-hub wrote")


def build_plan(args: argparse.Namespace, token: str | None) -> Plan:
    """Validate the command line and work out everything deploy will do. Pure: no network."""
    folder = Path(args.folder).resolve()
    if not (folder / "app.py").is_file() or not (folder / "README.md").is_file():
        raise DeployError(f"--folder: {str(folder)!r} has no app.py and README.md; pass the repository root")
    space = _repo_id("--space", args.space, "alice/my-chat")
    if args.hardware not in HARDWARE:
        raise DeployError(f"--hardware: {args.hardware!r} is not a Space hardware; accepted: {', '.join(HARDWARE)}")

    variables: dict[str, str] = {}
    warnings: list[str] = []
    if args.model is not None:
        if Path(args.model).exists():
            raise DeployError(
                f"--model: {args.model!r} is a local path, which the Space cannot see; upload it to the Hub "
                f"(hf upload OWNER/NAME {args.model}) and pass the repo id"
            )
        variables["CHATBOT_MODEL"] = _repo_id("--model", args.model, "alice/my-model-GGUF")
    if args.gguf_file is not None:
        if args.model is None:
            raise DeployError(f"--gguf-file: {args.gguf_file!r} given without --model; it picks a file in that repo")
        if not args.gguf_file.strip():
            raise DeployError("--gguf-file: '' is empty; expected a file name or glob such as '*Q4_K_M.gguf'")
        variables["CHATBOT_GGUF_FILE"] = args.gguf_file
    for assignment in args.set or []:
        key, value = _variable(assignment)
        variables[key] = value
    requirements_from = "requirements.txt"
    if args.hardware == ZEROGPU:
        _zerogpu_checks(args, variables)
        variables = {**ZEROGPU_VARIABLES, **variables}
        requirements_from = ZEROGPU_REQUIREMENTS
        if args.model is None:
            from chatbot.model_files import EMBEDDED_REPO_ID

            warnings.append(f"no --model: the Space serves {EMBEDDED_REPO_ID} from the Hub; pass --model USER/NAME, "
                            "the repo finetune.py --push-to-hub wrote")
    elif args.hardware in CPU_HARDWARE and variables.get("CHATBOT_DEVICE") == "cuda":
        raise DeployError(f"--set: CHATBOT_DEVICE=cuda, but hardware {args.hardware} has no GPU; accepted: auto or "
                          f"cpu, or --hardware {ZEROGPU} (ZeroGPU) or another GPU hardware")
    requirements = _read(folder, requirements_from)

    # The Space reads these with the app's own settings loader: a value it would refuse fails here, not after a rebuild.
    try:
        settings = load_settings(variables)
    except ConfigError as exc:
        raise DeployError(f"the Space would refuse to start: {exc}") from None

    if settings.backend == "transformers" and not _requirements_have(requirements, "torch"):
        warnings.append(
            "CHATBOT_BACKEND=transformers needs torch, transformers and peft in requirements.txt "
            f"(uncomment the three lines there, or use --hardware {ZEROGPU}), or the Space fails at start-up"
        )
    secrets = []
    if args.private_model:
        if args.model is None:
            raise DeployError("--private-model: given without --model; the embedded default model is public")
        if token is None and not args.dry_run:
            raise DeployError("--private-model: no Hugging Face token found; set HF_TOKEN or run `hf auth login`")
        if token is None:
            warnings.append("no Hugging Face token found: a real run needs HF_TOKEN or `hf auth login`")
        secrets.append("HF_TOKEN")

    files = select_files(folder)
    return Plan(
        space=space,
        folder=folder,
        files=files,
        variables=variables,
        requirements=requirements,
        requirements_from=requirements_from,
        secrets=secrets,
        hardware=args.hardware,
        request_hardware=args.hardware_given,
        private_space=args.private,
        warnings=warnings,
    )


def describe(plan: Plan) -> str:
    visibility = "private" if plan.private_space else "public"
    lines = [
        f"Space: {plan.url} (sdk gradio, hardware {plan.hardware}"
        + (" = ZeroGPU" if plan.hardware == ZEROGPU else "") + f", {visibility} if created now)",
        f"Files to upload from {plan.folder} ({len(plan.files)}):",
        *(f"  {f}" for f in plan.files),
        f"requirements.txt on the Space (from {plan.requirements_from}):",
        *(f"| {line}" for line in plan.requirements.rstrip("\n").splitlines()),
        "Space variables:" if plan.variables else "Space variables: none (the Space serves the embedded default model)",
        *(f"  {k}={v}" for k, v in sorted(plan.variables.items())),
        f"Other {VARIABLE_PREFIX}* variables already on the Space are deleted.",
        "Space secrets: " + (", ".join(f"{s} (your token, value not shown)" for s in plan.secrets) or "none"),
        *(f"warning: {w}" for w in plan.warnings),
    ]
    return "\n".join(lines)


def deploy(plan: Plan, api, token: str | None) -> str:
    """Carry out the plan through an HfApi-like object; returns the Space URL."""
    api.create_repo(
        plan.space,
        repo_type="space",
        space_sdk="gradio",
        space_hardware=plan.hardware,
        private=plan.private_space,
        exist_ok=True,
    )
    # Variables and secrets before the upload: the build the upload triggers then starts with the right settings.
    for key in sorted(api.get_space_variables(plan.space)):
        if key.startswith(VARIABLE_PREFIX) and key not in plan.variables:
            api.delete_space_variable(plan.space, key)
    for key, value in sorted(plan.variables.items()):
        api.add_space_variable(plan.space, key, value)
    for name in plan.secrets:
        api.add_space_secret(plan.space, name, token, description="read access to the private model")
    if plan.request_hardware:
        api.request_space_hardware(plan.space, plan.hardware)
    with tempfile.TemporaryDirectory(prefix="deploy-space-") as staging:
        folder = plan.folder if plan.requirements_from == "requirements.txt" else stage(plan, Path(staging))
        api.upload_folder(
            repo_id=plan.space,
            repo_type="space",
            folder_path=folder,
            allow_patterns=APP_PATTERNS,
            ignore_patterns=list(NEVER_UPLOAD),
            # Files the app no longer has (a renamed module) go away too; files outside the app are left alone.
            delete_patterns=APP_PATTERNS,
            commit_message="Deploy with tools/deploy_space.py",
        )
    return plan.url


def stage(plan: Plan, staging: Path) -> Path:
    """A copy of the planned files with the plan's requirements as requirements.txt: one commit, one rebuild."""
    for rel in plan.files:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(plan.folder / rel, staging / rel)
    (staging / "requirements.txt").write_text(plan.requirements, encoding="utf-8")
    return staging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/deploy_space.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True, help="the Space to create or update, USER/NAME")
    p.add_argument("--model", help="Hub repo the Space serves (sets CHATBOT_MODEL); default: the embedded SmolLM2")
    p.add_argument("--gguf-file", help="file name or glob in --model, e.g. '*Q4_K_M.gguf' (sets CHATBOT_GGUF_FILE)")
    p.add_argument("--private-model", action="store_true", help="--model is private: add your token as secret HF_TOKEN")
    p.add_argument("--set", action="append", metavar="CHATBOT_X=VALUE", help="any other Space variable; repeatable")
    p.add_argument("--hardware", default=None, help="Space hardware (default cpu-basic, 2 vCPU / 16 GB; "
                   f"{ZEROGPU} = ZeroGPU, which free accounts can host)")
    p.add_argument("--private", action="store_true", help="create the Space private (ignored if it exists)")
    p.add_argument("--folder", default=str(REPO_ROOT), help="repository root to upload from (default: this checkout)")
    p.add_argument("--dry-run", action="store_true", help="print files, variables and secrets; touch no network")
    args = p.parse_args(argv)
    args.hardware_given = args.hardware is not None
    args.hardware = args.hardware or SpaceHardware.CPU_BASIC.value
    return args


def main(argv: list[str] | None = None, api=None) -> int:
    args = parse_args(argv)
    from huggingface_hub import get_token  # reads HF_TOKEN or the saved login; no network

    token = get_token() if args.private_model else None
    try:
        plan = build_plan(args, token)
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("Dry run: nothing is sent to the Hub.")
        print(describe(plan))
        return 0
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        check_model_repo(plan, api, token)
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 2
    url = deploy(plan, api, token)
    build = "torch installs on first build" if plan.hardware == ZEROGPU else "llama-cpp-python compiles on first build"
    print(f"Deployed {len(plan.files)} files. The Space rebuilds now ({build}):")
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
