"""The layer contract of docs/architecture.md: each package of addon/ imports only from its own
package and from the layers below it (imports inside functions and under TYPE_CHECKING count too)."""

import ast
from pathlib import Path

import pytest

ADDON = Path(__file__).resolve().parents[2] / "addon"

# From the top down; a layer may name several modules or packages that do not import each other.
LAYERS = [
    {"cli"},
    {"script"},
    {"addons"},
    {"prefetch"},
    {"cache"},
    {"upstream"},
    {"observe"},
    {"proxy"},
    {"mitm"},
    {"blobserver"},
    {"fleet"},
    {"storage"},
    {"registry"},
    {"options", "units"},
]
RANK = {part: len(LAYERS) - i for i, layer in enumerate(LAYERS) for part in layer}


def part_of(module: tuple[str, ...]) -> str:
    """The layer part (package or top-level module) a module of the package belongs to."""
    return module[0]


def imports(path: Path) -> list[tuple[tuple[str, ...], int]]:
    """Every hubcache module `path` imports, as a path inside the package, with its line."""
    own = path.relative_to(ADDON).with_suffix("").parts
    package = own[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + tuple(node.module.split(".") if node.module else ())
            elif node.module and node.module.split(".")[0] == "hubcache":
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            if target:
                found.append((target, node.lineno))
            else:  # `from . import a, b` at the package's top: each name is a module
                found += [((alias.name,), node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(tuple(a.name.split(".")[1:]), node.lineno) for a in node.names if a.name.startswith("hubcache.")]
    return found


def modules() -> list[Path]:
    return sorted(ADDON.rglob("*.py"))


def test_every_part_of_the_package_has_its_layer():
    parts = {part_of(p.relative_to(ADDON).with_suffix("").parts) for p in modules()} - {"__init__"}
    assert parts == set(RANK), "a package or module that is in no layer, or a layer that is gone"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ADDON)))
def test_imports_run_only_downward(path):
    own = part_of(path.relative_to(ADDON).with_suffix("").parts)
    if own == "__init__":
        return
    upward = [
        f"{path.relative_to(ADDON)}:{line} imports {'.'.join(target)}"
        for target, line in imports(path)
        if part_of(target) != own and RANK[part_of(target)] >= RANK[own]
    ]
    assert not upward, "imports that run up or sideways: " + "; ".join(upward)


def test_the_contract_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a storage module importing the cache is caught."""
    bad = tmp_path / "storage" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from ..cache.hooks import RegistryCache\nfrom ..registry import protocol\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ADDON"]), "ADDON", tmp_path)
    assert imports(bad) == [(("cache", "hooks"), 1), (("registry",), 2)]
    with pytest.raises(AssertionError, match=r"storage/bad.py:1 imports cache.hooks"):
        test_imports_run_only_downward(bad)
