"""install.py against a stand-in for the host's ``launch`` module (A1111 modules/launch_utils.py: ``is_installed``
checks an importable package, ``run_pip(command, desc)`` runs pip with the host's Python)."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / "install.py"


def run_install(monkeypatch, installed):
    calls = []
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: name in installed
    launch.run_pip = lambda command, desc=None: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(INSTALL))
    return calls


def test_installs_only_what_is_missing(monkeypatch):
    assert run_install(monkeypatch, {"sentencepiece", "huggingface_hub"}) == []
    assert run_install(monkeypatch, {"huggingface_hub"}) == ['install "sentencepiece"']
    calls = run_install(monkeypatch, set())
    assert calls[0] == 'install "sentencepiece"' and calls[1].startswith('install "huggingface_hub')


@pytest.mark.parametrize(("lines", "expected"), [
    (["huggingface-hub (<1.0,>=0.14.1)", "huggingface-hub (<1.0,>=0.14.1) ; extra == 'torchhub'"],
     "huggingface_hub<1.0,>=0.14.1"),  # transformers 4.30.2 (A1111 1.10) writes the old form
    (["filelock", "huggingface-hub<3.0,>=1.31.0"], "huggingface_hub<3.0,>=1.31.0"),
    ([], "huggingface_hub<1"),
])
def test_huggingface_hub_in_a_version_the_hosts_transformers_accepts(monkeypatch, lines, expected):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "requires", lambda name: lines if name == "transformers" else None)
    calls = run_install(monkeypatch, {"sentencepiece"})
    assert len(calls) == 1
    quoted = calls[0].removeprefix("install ")
    assert quoted.startswith('"') and quoted.endswith('"'), "a shell would read < and > as redirections"
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(quoted.strip('"').removeprefix("huggingface_hub")) == SpecifierSet(
        expected.removeprefix("huggingface_hub"))


def test_the_installed_transformers_accepts_what_would_be_installed(monkeypatch):
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    calls = run_install(monkeypatch, {"sentencepiece"})
    wanted = Requirement(calls[0].removeprefix("install ").strip('"'))
    installed = Version(importlib.metadata.version("huggingface_hub"))
    assert installed in wanted.specifier  # this stack's own hub satisfies the line install.py derives


def test_never_touches_the_hosts_stack(monkeypatch):
    calls = run_install(monkeypatch, set())
    for package in ("torch", "transformers", "gradio", "safetensors", "--upgrade", "-U"):
        assert not any(package in c.split() for c in calls)


def test_the_package_version_is_pyprojects():
    import re
    from pathlib import Path

    import ella_ext

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == ella_ext.__version__
