"""curate: curated training data for text-embedding models."""

from curate.config import Config, load_config
from curate.errors import ConfigError, CurateError, DataError, StageMismatchError

__all__ = ["Config", "ConfigError", "CurateError", "DataError", "StageMismatchError", "load_config"]
__version__ = "0.1.0"
