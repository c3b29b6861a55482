"""Versions have one home, pyproject.toml: the version check and __version__ read the installed package's metadata."""

from __future__ import annotations

import pytest
import tomllib
from conftest import ROOT
from packaging.requirements import Requirement

import text_recognizer
from text_recognizer import util
from text_recognizer.util import UserError

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_checked_ranges_are_pyprojects() -> None:
    declared = {Requirement(line).name: str(Requirement(line).specifier) for line in PYPROJECT["dependencies"]}
    checked = {req.name: str(req.specifier) for req in util.supported()}
    assert checked == {name: spec for name, spec in declared.items() if spec}
    assert checked["ray"] == "<2.61,>=2.60" and "pytest" not in checked  # dev extras are not checked
    assert text_recognizer.__version__ == PYPROJECT["version"]


def test_a_release_outside_the_range_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = util.version
    monkeypatch.setattr(util, "version", lambda package: "2.7.0" if package == "pytorch-lightning" else real(package))
    with pytest.raises(UserError, match=r"^pytorch-lightning 2.7.0 is not supported: pip install 'pytorch-lightning<2.7,>=2.6'"):
        util.check_versions()
