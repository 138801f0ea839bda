"""siglip-dola: DoLa (Decoding by Contrasting Layers) for SigLIP vision towers.

    import siglip_dola
    model = siglip_dola.load()                                   # the embedded model; or "google/siglip-large-patch16-384"
    bank = siglip_dola.build_text_bank(model, ["cat", "dog"], templates=["a photo of a {}."])
    results = siglip_dola.DoLaSigLIP(model, mode="dynamic").classify(["photos/"], bank, top_k=5)

Names are imported lazily (on first use) so `import siglip_dola` and the CLI's --help stay fast.
"""
from __future__ import annotations

import importlib

from siglip_dola import dependencies as _dependencies
from siglip_dola.version import __version__

# An installed dependency outside its supported range fails here, in one line, not deep inside a model call.
# The `siglip-dola` command checks in main() instead, so that it can say it without a traceback.
if not _dependencies.started_as_cli():
    _dependencies.check_versions()

# public name -> module that defines it
_EXPORTS = {
    "load": "siglip_dola.loading",
    "from_model": "siglip_dola.loading",
    "build_text_bank": "siglip_dola.text_bank.build",
    "load_text_bank": "siglip_dola.text_bank.files",
    "DoLaSigLIP": "siglip_dola.scorer",
    "rerank_with_dola_siglip": "siglip_dola.scorer",
    "dola": "siglip_dola.scoring",
    "score": "siglip_dola.scoring",
    "resolve_layers": "siglip_dola.layers",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


_SUBMODULES = ("readout",)  # `siglip_dola.readout.from_model(...)` works after a plain `import siglip_dola`


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"siglip_dola.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'siglip_dola' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
