"""CLI subcommands, one module per job. Importing a module registers its subcommands with `siglip_dola.cli`."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
