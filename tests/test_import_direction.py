"""Imports run one way: shared/ never imports client/ or server/, and the coordinator never
loads the site's code (its data stack, its training tasks, the ClientApp).

Two proofs: every import statement in the source (top level or inside a function), and the
modules a fresh interpreter holds after importing the coordinator's entry points.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The site's side of shared/: what opens, preprocesses and trains on a site's images.
SITE_STACK = (
    "fedbreast.client",
    "fedbreast.shared.data.cache",
    "fedbreast.shared.data.datasets",
    "fedbreast.shared.data.preprocess",
    "fedbreast.shared.data.site_data",
    "fedbreast.shared.data.ingest",
    "fedbreast.shared.training.tasks",
    "fedbreast.shared.training.local",
    "fedbreast.shared.training.dp",
)
FORBIDDEN = {
    "shared": ("fedbreast.client", "fedbreast.server"),
    "server": SITE_STACK,
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, wherever it stands."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, module in imported_modules(path):
            for prefix in FORBIDDEN[folder]:
                if module == prefix or module.startswith(prefix + "."):
                    bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_import_runs_the_wrong_way(folder: str) -> None:
    assert violations(folder) == []


def test_the_coordinator_loads_no_site_code() -> None:
    code = (
        "import json, sys; import fedbreast.server.app, fedbreast.server.federation, fedbreast.server.launcher; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    site = [m for m in loaded if m.startswith(SITE_STACK) or m.split(".")[0] in ("scipy", "PIL", "pydicom", "opacus")]
    assert site == []
    ours = [m for m in loaded if m.startswith("fedbreast.")]
    print(f"importing the coordinator loads {len(ours)} fedbreast modules")
