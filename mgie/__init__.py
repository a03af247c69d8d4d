"""mgie: instruction-based image editing guided by a multimodal LLM (MGIE, ICLR 2024)."""

import logging

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # quiet optional-kernel notices on import

from mgie.config import ConfigError, MGIEConfig, load_config  # noqa: E402
from mgie.model import MGIEModel, MGIEOutput  # noqa: E402
from mgie.pipeline import EditResult, MGIEPipeline  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "EditResult",
    "MGIEConfig",
    "MGIEModel",
    "MGIEOutput",
    "MGIEPipeline",
    "load_config",
]
