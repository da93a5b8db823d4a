"""The version is stated once, in hub/__init__.py: everything else that names it takes it from there or agrees with
it (the package metadata, the worker, the OpenAPI document, image tags in the docs; k8s/ in test_k8s_manifests)."""

from __future__ import annotations

import json
import re
import tomllib

import hub
import producer
from tests.support import ROOT


def test_the_package_takes_its_version_from_the_hub() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"], "a second version in pyproject.toml would drift"
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hub.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", hub.__version__)


def test_the_worker_and_the_api_document_state_the_same_version() -> None:
    assert producer.__version__ == hub.__version__
    document = json.loads((ROOT / "hub" / "openapi.json").read_text())
    assert document["info"]["version"] == hub.__version__


def test_image_tags_in_the_docs_are_the_current_version() -> None:
    pages = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")])
    tags = {(page.name, tag) for page in pages for tag in re.findall(r"sse-hub:(\d+\.\d+\.\d+)", page.read_text())}
    assert tags, "the docs show how to build and run the image"
    assert {tag for _, tag in tags} == {hub.__version__}, sorted(tags)
