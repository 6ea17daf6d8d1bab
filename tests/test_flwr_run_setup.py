"""`flwr run .` installs nothing: the ``flwr`` CLI's own validation of the app turns Flower's runtime
dependency installation off for the local SuperLink it then starts (see qfl/server/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO

PROBE = """
import os
from pathlib import Path
from flwr.cli.config_utils import load_and_validate  # what `flwr run .` calls before starting a local SuperLink
from flwr.superlink.cli.flower_superlink import _runtime_dependency_install_default
assert _runtime_dependency_install_default(), "Flower's default should be to install; the test is moot otherwise"
config, warnings = load_and_validate(Path("pyproject.toml"))
print(os.environ.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"), _runtime_dependency_install_default())
"""


def _probe(env: dict[str, str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_flwr_validation_disables_runtime_dependency_installation() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"}
    assert _probe(env) == ["1", "False"]  # a SuperLink started from here: no `uv sync` of the app's dependencies


def test_an_explicit_setting_wins() -> None:
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "0"}
    assert _probe(env) == ["0", "True"]
