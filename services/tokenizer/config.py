"""Tokenizer service configuration: flags, their RADIXSERVE_* twins, and validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.config import option


@dataclass(frozen=True)
class TokenizerConfig:
    model_path: str = option(
        "default", "HF directory, .gguf file or Hub id ('default': SmolLM2-135M-Instruct)"
    )
    chat_template: str | None = option(
        None, "Jinja chat template file used instead of the model's own"
    )
    host: str = option("127.0.0.1", "address the gRPC server binds")
    port: int = option(30001, "gRPC port")

    def __post_init__(self) -> None:
        if self.chat_template is not None and not Path(self.chat_template).expanduser().is_file():
            raise ValueError(f"--chat-template {self.chat_template} is not a file")
        if not 0 <= self.port < 65536:
            raise ValueError("--port must be in [0, 65535]")
