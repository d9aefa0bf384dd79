"""Validate a Prometheus text exposition the way the issue asks: ``promtool check metrics``.

CI machines start bare, so our own lint (shared/observability.py, promtool's naming rules)
always runs, and promtool runs in addition whenever it is on PATH
(``apt-get install prometheus``). Which validators ran is returned and printed.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
import warnings

from fedbreast.shared.observability import lint_exposition

PROMTOOL = shutil.which("promtool")


def validate_exposition(text: str) -> list[str]:
    problems = lint_exposition(text)
    assert not problems, "\n".join(problems)
    ran = ["fedbreast lint"]
    if PROMTOOL:
        done = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not done.stdout.strip(), f"promtool check metrics:\n{done.stdout}{done.stderr}"
        ran.append("promtool check metrics")
    else:
        warnings.warn(
            "promtool is not on PATH: the exposition was checked by fedbreast's lint only "
            "(apt-get install prometheus to run promtool too)",
            stacklevel=2,
        )
    print(f"exposition validated by: {', '.join(ran)}")
    return ran


def get(url: str) -> tuple[int, str]:
    """HTTP GET that returns (status, body) for error statuses too."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
