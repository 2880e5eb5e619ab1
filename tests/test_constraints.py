"""constraints.txt (make installs with it; make lock writes it) pins every dependency that
pyproject.toml declares, at a version its range admits, and the environment the tests run in
has those versions: a dependency added without `make lock`, or an install without the
constraints, would float with PyPI's newest release."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, v = line.partition("==")
            assert sep, f"constraints.txt: not an exact pin: {line!r}"
            out[canonicalize_name(name)] = Version(v)
    return out


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + [r for e in extras.values() for r in e]]


def test_every_declared_dependency_is_pinned_within_its_range():
    pinned = pins()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not in constraints.txt: run make lock"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pinned[name]}, outside {req}: run make lock")


def test_installed_versions_are_the_pinned_ones():
    """Where a pinned package is installed, it is the pinned version (local labels such as
    torch's +cpu aside): the venv was built with the constraints."""
    wrong = []
    for name, v in pins().items():
        try:
            have = Version(version(name))
        except PackageNotFoundError:  # make run installs no cluster extra
            continue
        if Version(have.public) != v:
            wrong.append(f"{name} {have} (pinned {v})")
    assert not wrong, "installed versions differ from constraints.txt: " + ", ".join(wrong)
