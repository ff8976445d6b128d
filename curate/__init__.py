"""curate: curated training data for text-embedding models.

The Python API mirrors the CLI: ``curate.run(config)``, ``curate.validate(config)``,
``curate.loop(config, rounds)``, ``curate.write_report(outdir)``, and ``curate.api`` with one
function per subcommand (``curate.api.mine(config)`` ...). Importing curate stays light: torch,
Dask and FAISS load on the first call.
"""

from curate import api
from curate.api import loop, run, validate, write_report
from curate.config import Config, load_config
from curate.errors import ConfigError, CurateError, DataError, StageMismatchError

__all__ = [
    "Config",
    "ConfigError",
    "CurateError",
    "DataError",
    "StageMismatchError",
    "api",
    "load_config",
    "loop",
    "run",
    "validate",
    "write_report",
]
__version__ = "0.1.0"
