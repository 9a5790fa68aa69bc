"""Every module imports (catches syntax errors and import cycles in code no other test reaches)."""

import importlib
import pkgutil

import prefalign


def test_import_every_module():
    names = [m.name for m in pkgutil.walk_packages(prefalign.__path__, "prefalign.")]
    assert len(names) > 5
    for name in names:
        if name == "prefalign.__main__":
            continue
        importlib.import_module(name)
