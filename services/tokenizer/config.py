"""Tokenizer service configuration: flags, their RADIXSERVE_* twins, and validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.config import option
from services.common.metrics import ServiceConfig
from services.tokenizer.chat_templates import BUILTIN_TEMPLATES


@dataclass(frozen=True)
class TokenizerConfig(ServiceConfig):
    model_path: str = option(
        "default", "HF directory, .gguf file or Hub id ('default': SmolLM2-135M-Instruct)"
    )
    chat_template: str | None = option(
        None,
        "Jinja chat template file, or a built-in template's name "
        f"({', '.join(BUILTIN_TEMPLATES)}), used instead of the model's own",
    )
    host: str = option("127.0.0.1", "address the gRPC server binds")
    port: int = option(30001, "gRPC port")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_template(self.chat_template):
            raise ValueError(
                f"--chat-template {self.chat_template} is not a file or a built-in template "
                f"({', '.join(BUILTIN_TEMPLATES)})"
            )
        if not 0 <= self.port < 65536:
            raise ValueError("--port must be in [0, 65535]")


def _is_template(value: str | None) -> bool:
    """Unset, a built-in template's name, or a file."""
    return value is None or value in BUILTIN_TEMPLATES or Path(value).expanduser().is_file()
