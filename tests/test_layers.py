"""The package's layout holds: each wing imports only what it may, and no import circles.

The rules (docs/design.md, "The house"):
- the core (the root modules but the ones that assemble the relay) imports no wing;
- `channels` and `store` import only the core;
- `smtp` and `admin` import the core, `store` and `channels`, never each other;
- `delivery` (the route chain, the forward, the queue) imports the core, `store`
  and `channels`; `smtp` may import it (the session hands it the charged message);
- `events` (webhooks, suppressions' operations) imports the core and `store`;
  `admin` may import it (its routes call the same operations as the CLI);
- the top (`server`, `workers`, `cli`, `__main__`) may import anything.
No module imports itself through others, counting the imports made only for
type checking (`if TYPE_CHECKING:`): a circle says a concept sits in the
wrong module even where Python runs it.

The imports are read from the source with `ast`, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RELAY = Path(__file__).resolve().parent.parent / "relay"
WINGS = ("smtp", "channels", "store", "admin", "delivery", "events")
TOP = ("server", "workers", "cli", "__main__")
ALLOWED = {
    "core": {"core"},
    "channels": {"core", "channels"},
    "store": {"core", "store"},
    "smtp": {"core", "store", "channels", "delivery", "smtp"},
    "delivery": {"core", "store", "channels", "delivery"},
    "admin": {"core", "store", "channels", "admin", "events"},
    "events": {"core", "store", "events"},
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(root, path): path for path in root.rglob("*.py")}


def imports(root: Path) -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports (any depth,
    inside functions and `if TYPE_CHECKING:` too)."""
    known = modules(root)
    package = root.name
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    # `from relay.store import ledger` imports the module ledger;
                    # `from relay.store.ledger import Ledger` imports a name of it.
                    targets.add(candidate if candidate in known else node.module)
        graph[name] = {t for t in targets if t in known and t != name and t != package}
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in WINGS:
        return parts[1]
    return "top" if parts[1] in TOP else "core"


def forbidden(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in sorted(graph.items()):
        source = layer(module)
        if source in ("top", "package"):
            continue
        for target in sorted(targets):
            if layer(target) not in ALLOWED[source]:
                wrong.append(f"{module} -> {target}")
    return wrong


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_each_wing_imports_only_what_it_may() -> None:
    assert forbidden(imports(RELAY)) == []


def test_no_import_circles_not_even_through_type_checking() -> None:
    assert circles(imports(RELAY)) == []


def test_the_wings_are_there() -> None:
    graph = imports(RELAY)
    for wing in WINGS:
        assert f"relay.{wing}" in graph
        assert any(m.startswith(f"relay.{wing}.") for m in graph), wing


# --- the checks themselves fail when the rules are broken ------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "relay"
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for wing in WINGS:
        (root / wing).mkdir(parents=True, exist_ok=True)
        (root / wing / "__init__.py").touch()
    (root / "__init__.py").touch()
    return root


@pytest.mark.parametrize(
    ("path", "line", "broken"),
    [
        (
            "policy.py",
            "from relay.store.ledger import Ledger",
            "relay.policy -> relay.store.ledger",
        ),
        (
            "channels/resend.py",
            "from relay.store import ledger",
            "relay.channels.resend -> relay.store.ledger",
        ),
        (
            "store/ledger.py",
            "import relay.smtp.protocol",
            "relay.store.ledger -> relay.smtp.protocol",
        ),
        (
            "smtp/protocol.py",
            "from relay.admin import api",
            "relay.smtp.protocol -> relay.admin.api",
        ),
        (
            "admin/api.py",
            "from relay.smtp.protocol import X",
            "relay.admin.api -> relay.smtp.protocol",
        ),
        ("config.py", "from relay.server import Relay", "relay.config -> relay.server"),
    ],
)
def test_a_forbidden_import_is_found(tmp_path: Path, path: str, line: str, broken: str) -> None:
    files = {
        "policy.py": "",
        "config.py": "",
        "server.py": "from relay.smtp import protocol\n",
        "channels/resend.py": "from relay import policy\n",
        "store/ledger.py": "from relay.policy import decide\n",
        "smtp/protocol.py": "from relay.store.ledger import Ledger\n",
        "admin/api.py": "from relay.store import ledger\n",
    }
    root = _tree(tmp_path, files)
    assert forbidden(imports(root)) == []
    target = root / path
    target.write_text(target.read_text() + line + "\n")
    assert forbidden(imports(root)) == [broken]


def test_a_circle_through_a_type_checking_import_is_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "smtp/protocol.py": "from relay.smtp.session import Submission\n",
            "smtp/session.py": "from typing import TYPE_CHECKING\n",
        },
    )
    assert circles(imports(root)) == []
    session = root / "smtp" / "session.py"
    session.write_text(
        session.read_text() + "if TYPE_CHECKING:\n    from relay.smtp.protocol import P\n"
    )
    assert circles(imports(root)) == [["relay.smtp.protocol", "relay.smtp.session"]]
