"""The wheel must hold every package: folders are mapped by hand in pyproject.toml."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"


def test_every_builtin_plugin_file_has_an_entry_point():
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["hybridlab"]
    modules = set(entry_points.values())
    files = {"hybridlab.plugins." + ".".join(p.relative_to(ROOT / "plugins").with_suffix("").parts)
             for p in (ROOT / "plugins").rglob("*.py") if p.name != "__init__.py"}
    assert files - modules == set(), f"plugin files without an entry point: {sorted(files - modules)}"
