"""Python modules a recipe names under `imports:`, imported when the recipe loads.

A new method registers itself when its module is imported (`@ADVANTAGES.register("mine")` on a
function), so `imports: [my_methods.py]` plus `algorithm.advantage: mine` is all a recipe needs
(docs/extending.md). A reference is a dotted module name (importable from the Python path) or a
path to a .py file. A file is imported once per process whatever its reference's spelling, since
importing it twice would register its entries twice. A file's own directory goes on the import
path before it runs, so it can import a module beside it (`from helpers import parse`), as it
could run as a script; a reward worker imports the file through here too. No torch import here:
reward workers load this module.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from efficient_rl.errors import PluginError


def import_plugins(references: list[str]) -> None:
    for reference in references:
        if reference.endswith(".py"):
            import_file(Path(reference))
        else:
            import_module(reference)


def import_file(path: Path, prefix: str = "efficient_rl_plugin"):
    """The module of a .py file, imported on first use and then kept in sys.modules."""
    if not path.is_file():
        raise PluginError(f"{path} not found")
    name = f"{prefix}_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)  # first, as for a script: its own helpers before installed namesakes
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: an import cycle back to it finds it
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise PluginError(f"importing {path} failed: {type(err).__name__}: {err}") from None
    return module


def import_module(name: str):
    try:
        return importlib.import_module(name)
    except Exception as err:
        raise PluginError(f"cannot import {name} ({type(err).__name__}: {err})") from None
