"""The docs' shell examples, run as written: the one-machine cluster of docs/operations.md
(`ray start`, token authentication, `ray job submit --working-dir .`), from a copy of the
checkout, with a home folder of its own (the token) and nothing but the example's text."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
MARK = "<!-- run by tests/test_docs_examples.py -->"


def _examples(doc: Path) -> list[str]:
    text = doc.read_text()
    return re.findall(re.escape(MARK) + r"\n```bash\n(.*?)```", text, flags=re.S)


def _checkout(into: Path) -> Path:
    """The checkout's tracked files (what a clone holds), or the tree less what git ignores."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        for rel in listed.stdout.decode().split("\0"):
            if rel and (REPO / rel).is_file():
                (into / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, into / rel)
    else:
        shutil.copytree(REPO, into, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git", ".venv", "ntf-work", "__pycache__", "*.egg-info"))
    return into


def test_the_one_machine_cluster_example_runs_as_written(tmp_path):
    examples = _examples(REPO / "docs" / "operations.md")
    assert len(examples) == 1, "docs/operations.md marks one example for this test"
    checkout = _checkout(tmp_path / "checkout")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    script = "set -euo pipefail\ntrap 'ray stop --force >/dev/null 2>&1 || true' EXIT\n" + examples[0]
    try:
        done = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=840)
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    assert "succeeded" in log, log[-3000:]
    assert (checkout / "ntf-work" / "cluster-run" / "detector" / "model.json").is_file()
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert token and token not in log  # the example never prints the cluster's token
    assert oct((home / ".ray" / "auth_token").stat().st_mode & 0o777) == "0o600"
