"""Where a model's files are: a local Hugging Face-style directory as given, a .gguf file
converted once, or a snapshot downloaded from the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path

from engine.errors import UnsupportedModelError

# what the engine reads from a hub repository: config, weights, tokenizer, chat template
_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors",
                 "model.safetensors.index.json", "tokenizer*", "vocab.json", "merges.txt",
                 "special_tokens_map.json", "added_tokens.json", "chat_template.*"]


def resolve_model_dir(model: str) -> Path:
    """A local HF-style directory for `model`: as given, converted from GGUF, or downloaded."""
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UnsupportedModelError(f"GGUF file {path} does not exist")
        from engine.gguf import convert_gguf  # heavy (transformers GGUF path): only when used

        return Path(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnsupportedModelError(f"{path} is not a model directory: it has no config.json")
        return path
    if path.exists():
        raise UnsupportedModelError(f"{path} is neither a model directory nor a .gguf file")
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise UnsupportedModelError(f"model path {model} does not exist")
    return _download(model)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        raise UnsupportedModelError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}); the hub may be unreachable: pass a local model directory "
            "(config.json + *.safetensors) or a .gguf file instead") from exc
