"""Which code produced a result: abp's and torch's versions and, from a git checkout, the commit.

Results that people compare (the paper grid's records, the bench's JSON files) carry this, so a figure that moves
between two runs of the same command can be traced to a code change rather than guessed at.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

import torch

import abp

_PACKAGE_DIR = Path(abp.__file__).resolve().parent


def git(repo: str | os.PathLike, *args: str) -> Optional[str]:
    """`git -C repo args...` stdout, or None when git or the checkout is not there (read-only: no index refresh)."""
    try:
        env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, env=env)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(repo: str | os.PathLike) -> dict:
    """{"commit": short hash or None, "dirty": tracked files changed since it (None when unknown)}."""
    commit = git(repo, "rev-parse", "--short", "HEAD")
    status = git(repo, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def code_version() -> dict:
    """abp and torch versions, plus abp's commit when it runs from a git checkout (editable install)."""
    return {"abp": abp.__version__, "torch": torch.__version__, **git_state(_PACKAGE_DIR)}
