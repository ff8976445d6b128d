"""curate: curated training data for text-embedding models.

The Python API mirrors the CLI: ``curate.run(config)``, ``curate.validate(config)``,
``curate.loop(config, rounds)``, ``curate.write_report(outdir)``, and ``curate.api`` with one
function per subcommand (``curate.api.mine(config)`` ...). Importing curate stays light: torch,
Dask and FAISS load on the first call.

The API lives above the library, in ``pipelines.api`` (it runs the stages on Dask); these names
reach it on first use, so no module of the library imports the wiring layer
(docs/architecture.md).
"""

from curate.config import Config, load_config
from curate.errors import ConfigError, CurateError, DataError, StageMismatchError

_API = ("api", "loop", "run", "validate", "write_report")

__all__ = [
    "Config",
    "ConfigError",
    "CurateError",
    "DataError",
    "StageMismatchError",
    *_API,
    "load_config",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'curate' has no attribute {name!r}")
    import sys

    from pipelines import api

    sys.modules.setdefault("curate.api", api)  # ``import curate.api`` names the same module
    return api if name == "api" else getattr(api, name)
