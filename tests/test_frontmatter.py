"""The README's YAML front matter is the Space's configuration: a wrong field means a Space that never builds."""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from huggingface_hub import SpaceCard, SpaceCardData
from huggingface_hub.repocard import metadata_load
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# From the Spaces configuration reference (huggingface.co/docs/hub/spaces-config-reference).
THUMBNAIL_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
SHORT_DESCRIPTION_MAX = 60  # the Hub refuses a push with a longer one


@pytest.fixture(scope="module")
def card_data() -> SpaceCardData:
    card = SpaceCard.load(README)
    assert isinstance(card.data, SpaceCardData)
    return card.data


def _pin(package: str) -> str:
    """The exact version `package==X` is pinned to in requirements.txt."""
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        if req.name.lower() == package:
            specs = list(req.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"{package} must be pinned with ==, got {line!r}"
            return specs[0].version
    pytest.fail(f"{package} is not in requirements.txt")


def test_front_matter_is_the_first_thing_in_the_readme():
    # The Hub only reads a YAML block at the very top; anything before it and the Space has no config.
    assert README.read_text(encoding="utf-8").startswith("---\n")
    assert metadata_load(README) is not None


def test_sdk_is_gradio_at_the_pinned_version(card_data):
    assert card_data.sdk == "gradio"
    # YAML would turn an unquoted 6.30 into a float; the Hub needs the exact string.
    assert isinstance(card_data.sdk_version, str)
    assert card_data.sdk_version == _pin("gradio"), "README sdk_version must equal gradio's pin in requirements.txt"


def test_sdk_version_is_the_installed_gradio():
    # What the tests exercised is what the Space will run.
    assert metadata_load(README)["sdk_version"] == metadata.version("gradio")


def test_python_version_is_a_string_the_tests_ran_on(card_data):
    version = card_data.python_version
    assert isinstance(version, str), f"python_version must be quoted in YAML, got {version!r}"
    assert re.fullmatch(r"3\.\d+(\.\d+)?", version), version
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert ".".join(version.split(".")[:2]) == running, (
        f"the Space runs Python {version}, the tests ran on {running}"
    )
    gradio_needs = metadata.metadata("gradio").get("Requires-Python") or ""
    assert SpecifierSet(gradio_needs).contains(version), f"gradio needs Python {gradio_needs}"


def test_app_file_exists(card_data):
    assert card_data.app_file == "app.py"
    assert (ROOT / card_data.app_file).is_file()


def test_thumbnail_fields(card_data):
    meta = card_data.to_dict()
    assert isinstance(card_data.title, str) and card_data.title.strip()
    emoji = meta.get("emoji")
    assert isinstance(emoji, str) and emoji and not any(ch.isascii() for ch in emoji), emoji
    assert meta.get("colorFrom") in THUMBNAIL_COLORS
    assert meta.get("colorTo") in THUMBNAIL_COLORS


def test_license_and_short_description(card_data):
    assert isinstance(card_data.license, str) and card_data.license.strip()
    short = card_data.to_dict().get("short_description")
    assert isinstance(short, str) and short.strip()
    assert len(short) <= SHORT_DESCRIPTION_MAX, f"short_description is {len(short)} chars, the Hub takes {SHORT_DESCRIPTION_MAX}"


def test_models_lists_the_default_model(card_data):
    from chatbot.model_files import EMBEDDED_REPO_ID

    assert isinstance(card_data.models, list)
    assert EMBEDDED_REPO_ID in card_data.models
