"""One module per model family; each registers itself (convert.family.register) when imported by
`load_all`. A new family is one file here."""

import importlib
import pkgutil


def load_all() -> None:
    """Import every family module of this package (each registers its Family)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
