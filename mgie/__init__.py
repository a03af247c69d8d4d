"""mgie: instruction-based image editing guided by a multimodal LLM (MGIE, ICLR 2024)."""

import logging

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # quiet optional-kernel notices on import

from mgie.config import ConfigError, MGIEConfig, load_config
from mgie.model import MGIEModel, MGIEOutput
from mgie.pipeline import EditResult, MGIEPipeline

__version__ = "0.1.0"
__all__ = ["ConfigError", "EditResult", "MGIEConfig", "MGIEModel", "MGIEOutput", "MGIEPipeline", "load_config"]
