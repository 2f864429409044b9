"""One logging set-up for every service: `time level service: message` on stderr."""

from __future__ import annotations

import logging
import os


def setup_logging(service: str, level: str | None = None) -> logging.Logger:
    level_name = (level or os.environ.get("RADIXSERVE_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(
        level=getattr(logging, level_name, logging.INFO),
        format=f"%(asctime)s %(levelname)s {service}: %(message)s",
        datefmt="%H:%M:%S",
    )
    return logging.getLogger(f"radixserve.{service}")
