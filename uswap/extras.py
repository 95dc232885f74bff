"""Optional dependencies: a command whose extra is not installed says which one to install.

The daemon and the clients need only cffi and trio (pyproject.toml
``dependencies``).  The rest comes with extras:

    uswap[fuse]   pyfuse3                   uswap mount (kernel swap through uswap)
    uswap[bench]  rich, matplotlib, numpy   uswap bench
    uswap[demo]   numpy                     uswap demo
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> the extra that brings it (pyproject.toml [project.optional-dependencies])
EXTRA_OF = {"pyfuse3": "fuse", "rich": "bench", "matplotlib": "bench", "numpy": "bench"}


class MissingExtra(ImportError):
    """A command needs a module that only an extra installs; the text says which."""


def require(module: str, command: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` for ``command`` (e.g. "uswap mount"), or raise MissingExtra naming the extra."""
    extra = extra or EXTRA_OF[module]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name != module and not module.startswith(e.name + "."):
            raise   # the module is there but something it imports is broken: not a missing extra
        raise MissingExtra(f"{command} needs {module}, which is not installed: "
                           f"pip install 'uswap[{extra}]'") from None
