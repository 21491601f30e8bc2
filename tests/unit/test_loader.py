"""The loader: dtype/device resolution, directory and format errors, sharded safetensors,
pickle opt-in, and what LoadedModel holds."""

from __future__ import annotations

import json
import shutil
import tempfile
import types
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
import transformers

import engine.weights
from engine import runtime
from engine.attention.base import AttentionMetadata
from engine.errors import InvalidRequestError, UnsupportedModelError
from engine.loader import LoadedModel, drop_construction_copies, load_model
from engine.models import SUPPORTED_ARCHITECTURES, kv_cache_spec
from engine.models.base import CausalLM
from engine.runtime import resolve_device, resolve_dtype
from engine.weights import iter_safetensors, safetensors_files
from tests.tiny_models import build_config, save_tiny_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("config_dtype", "device", "expected"), [
    ("bfloat16", CPU, torch.bfloat16),
    ("float32", CPU, torch.float32),
    ("float16", CPU, torch.bfloat16),  # fp16 matmuls are slow on CPU
    ("float16", CUDA, torch.float16),
    ("bfloat16", CUDA, torch.bfloat16),
    ("float32", CUDA, torch.float32),
    (None, CPU, torch.float32),
    ("float8_e4m3fn", CUDA, torch.float32),  # not one we compute in: fall back to float32
])
def test_auto_dtype_follows_the_checkpoint(config_dtype: str | None, device: torch.device,
                                           expected: torch.dtype) -> None:
    """On a CPU without native bf16 (and on CUDA) "auto" is the checkpoint's dtype."""
    config = build_config("llama")
    config.dtype = config_dtype
    assert resolve_dtype("auto", config, device, cpu_native_bf16=False) == expected


@pytest.mark.parametrize("config_dtype", ["float32", "bfloat16", "float16", None])
def test_auto_dtype_is_bfloat16_on_a_cpu_with_native_bf16(config_dtype: str | None) -> None:
    """The fast path without flags: a float32 checkpoint (the embedded default model's) is
    served in bf16 where the CPU computes bf16 natively; an explicit dtype still wins."""
    config = build_config("llama")
    config.dtype = config_dtype
    assert resolve_dtype("auto", config, CPU, cpu_native_bf16=True) == torch.bfloat16
    assert resolve_dtype("float32", config, CPU, cpu_native_bf16=True) == torch.float32


def test_auto_dtype_probes_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an answer given, the CPU's own flags decide (AVX512-BF16 or AMX-BF16)."""
    config = build_config("llama")
    config.dtype = "float32"
    for flags, expected in [({"avx2", "avx512f"}, torch.float32),
                            ({"avx512f", "avx512_bf16"}, torch.bfloat16),
                            ({"amx_bf16", "amx_tile"}, torch.bfloat16), (set(), torch.float32)]:
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: flags)
        assert resolve_dtype("auto", config, CPU) == expected, flags
    assert resolve_dtype("auto", config, CUDA) == torch.float32


def test_auto_dtype_reads_transformers4_torch_dtype() -> None:
    legacy = types.SimpleNamespace(torch_dtype="float16")
    assert resolve_dtype("auto", legacy, CUDA) == torch.float16  # type: ignore[arg-type]
    assert resolve_dtype("auto", legacy, CPU) == torch.bfloat16  # type: ignore[arg-type]


@pytest.mark.parametrize(("dtype", "expected"), [("float16", torch.float16),
                                                 ("bfloat16", torch.bfloat16),
                                                 ("float32", torch.float32)])
def test_explicit_dtype_is_honored(dtype: str, expected: torch.dtype) -> None:
    config = build_config("llama")
    config.dtype = "bfloat16"
    assert resolve_dtype(dtype, config, CPU) == expected


def test_bad_dtype_and_device_are_invalid() -> None:
    with pytest.raises(InvalidRequestError, match="dtype"):
        resolve_dtype("float64", build_config("llama"), CPU)
    with pytest.raises(InvalidRequestError):
        resolve_device("tpu")
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequestError, match="CUDA is not available"):
            resolve_device("cuda")


def copy_model_dir(source: Path, target: Path, weights: bool = True) -> Path:
    shutil.copytree(source, target, ignore=None if weights else shutil.ignore_patterns(
        "*.safetensors"))
    return target


def test_unknown_architecture_names_the_supported_ones(tiny_llama_dir: Path,
                                                       tmp_path: Path) -> None:
    model_dir = copy_model_dir(tiny_llama_dir, tmp_path / "foo")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="FooForCausalLM") as excinfo:
        load_model(str(model_dir), device="cpu")
    assert all(name in str(excinfo.value) for name in SUPPORTED_ARCHITECTURES)


def test_missing_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_unreachable_hub_asks_for_a_local_model(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    # Offline mode and an empty cache: the hub client must fail without any network access.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="unreachable.*local model directory"):
        load_model("pagedserve-tests/no-such-model")


def test_pickle_weights_need_allow_pickle(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_model_dir(tiny_llama_dir, tmp_path / "pickled", weights=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.save(reference.state_dict(), model_dir / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="allow_pickle"):
        load_model(str(model_dir), dtype="float32", device="cpu")
    loaded = load_model(str(model_dir), dtype="float32", device="cpu", allow_pickle=True)
    assert_same_weights(loaded.model, load_model(str(tiny_llama_dir), dtype="float32",
                                                 device="cpu").model)


def test_directory_without_weights_is_an_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_model_dir(tiny_llama_dir, tmp_path / "empty", weights=False)
    with pytest.raises(UnsupportedModelError, match="no weights"):
        load_model(str(model_dir), device="cpu")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name, param in params_a.items():
        assert torch.equal(param, params_b[name]), name


def test_sharded_safetensors_load_like_a_single_file(tiny_model_dirs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    source = tiny_model_dirs["qwen3"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(source)
    sharded = copy_model_dir(source, tmp_path / "sharded", weights=False)
    reference.save_pretrained(sharded, max_shard_size="100KB")
    assert len(safetensors_files(sharded)) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    names = [name for name, _ in iter_safetensors(sharded)]
    assert sorted(names) == sorted(reference.state_dict())  # each tensor exactly once
    assert_same_weights(load_model(str(sharded), dtype="float32", device="cpu").model,
                        load_model(str(source), dtype="float32", device="cpu").model)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_iter_safetensors_reads_what_safetensors_reads(tmp_path: Path, dtype: torch.dtype | None
                                                      ) -> None:
    tensors = {"a.weight": torch.randn(300, 7), "b": torch.randn(5).bfloat16(),
               "ids": torch.arange(6, dtype=torch.int64).view(2, 3), "scalar": torch.tensor(1.5),
               "empty": torch.zeros(0, 4)}
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    read = dict(iter_safetensors(tmp_path, dtype))
    assert read.keys() == tensors.keys()
    for name, expected in tensors.items():
        if dtype is not None and expected.is_floating_point():
            expected = expected.to(dtype)
        assert read[name].dtype == expected.dtype and torch.equal(read[name], expected), name


def test_chunked_conversion_covers_every_element(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A chunk smaller than the tensor (and not dividing it) exercises the conversion loop.
    monkeypatch.setattr(engine.weights, "_READ_CHUNK_BYTES", 1000)
    tensor = torch.randn(37, 29)
    safetensors.torch.save_file({"w": tensor}, tmp_path / "model.safetensors")
    ((_, read),) = iter_safetensors(tmp_path, torch.bfloat16)
    assert torch.equal(read, tensor.bfloat16())


def test_truncated_safetensors_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UnsupportedModelError, match="truncated"):
        list(iter_safetensors(tmp_path))


def test_loaded_model_fields(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["gpt2"]
    loaded = load_model(str(model_dir), dtype="bfloat16", device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, CausalLM) and not loaded.model.training
    assert loaded.hf_config.architectures == ["GPT2LMHeadModel"]
    assert loaded.model_dir == model_dir
    assert (loaded.dtype, loaded.device) == (torch.bfloat16, CPU)
    assert loaded.generation_config is not None and loaded.generation_config.eos_token_id == 2
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("Hello, world!")) == "Hello, world!"
    assert all(p.dtype == torch.bfloat16 and p.device == CPU and not p.requires_grad
               for p in loaded.model.parameters())
    assert all(not b.is_meta for b in loaded.model.buffers())


def test_bfloat16_model_runs_and_tracks_float32(tiny_model_dirs: dict[str, Path]) -> None:
    """A bf16 load converts every tensor on the way in; its logits stay near the fp32 ones."""
    model_dir = tiny_model_dirs["qwen2"]
    logits = {dtype: prefill_logits(load_model(str(model_dir), dtype=dtype, device="cpu"))
              for dtype in ("float32", "bfloat16")}
    assert logits["bfloat16"].dtype == torch.float32
    scale = logits["float32"].abs().max()
    assert (logits["bfloat16"] - logits["float32"]).abs().max() < 0.05 * scale


def test_tied_embeddings_share_one_tensor(tmp_path: Path) -> None:
    model_dir = save_tiny_model("qwen2", tmp_path / "tied", tie_word_embeddings=True)
    model = load_model(str(model_dir), dtype="float32", device="cpu").model
    assert isinstance(model, CausalLM)
    assert model.output_embedding() is model.model.embed_tokens.weight
    assert not any("lm_head" in name for name, _ in model.named_parameters())


def test_generation_config_is_optional(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_model_dir(tiny_llama_dir, tmp_path / "no-gen")
    (model_dir / "generation_config.json").unlink()
    assert load_model(str(model_dir), device="cpu").generation_config is None


@torch.inference_mode()
def prefill_logits(loaded: LoadedModel) -> torch.Tensor:
    spec = kv_cache_spec(loaded.hf_config)
    shape = (4, 8, spec.num_kv_heads, spec.head_dim)
    kv_caches = [(torch.zeros(shape, dtype=loaded.dtype), torch.zeros(shape, dtype=loaded.dtype))
                 for _ in range(spec.num_layers)]
    num_tokens = 12
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens), cu_seqlens_q=torch.tensor([0, num_tokens]),
        seq_lens=torch.tensor([num_tokens]), block_tables=torch.tensor([[0, 1]]),
        max_seqlen_q=num_tokens, max_seqlen_k=num_tokens, query_lens_cpu=[num_tokens],
        seq_lens_cpu=[num_tokens])
    input_ids = torch.tensor(loaded.tokenizer.encode("The quick brown fox jumps over"))
    input_ids = torch.cat([input_ids, input_ids])[:num_tokens]
    hidden = loaded.model(input_ids, torch.arange(num_tokens), kv_caches, metadata)
    return loaded.model.compute_logits(hidden)


@pytest.mark.parametrize(("flags", "expected"), [({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                                 ({"avx2"}, torch.float32)])
def test_serve_without_flags_loads_bf16_where_the_cpu_has_it(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        flags: set[str], expected: torch.dtype) -> None:
    """`pagedserve serve MODEL` with no flags: the settings leave dtype "auto", and the loader
    turns the fp32 checkpoint into bf16 on a CPU with native bf16 (probed), saying why."""
    from server.settings import Settings

    settings = Settings()
    assert settings.dtype == "auto"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    with caplog.at_level("INFO", logger="engine.loader"):
        loaded = load_model(str(tiny_llama_dir), dtype=settings.dtype, device="cpu")
    assert loaded.dtype == expected
    assert next(loaded.model.parameters()).dtype == expected
    reason = "this CPU computes bfloat16 natively" if expected == torch.bfloat16 else \
        "auto: the checkpoint's"
    assert reason in caplog.text


@pytest.mark.parametrize("class_name", ["GPT2Tokenizer", "LlamaTokenizer", "Qwen2Tokenizer"])
def test_tokenizer_works_the_same_without_its_construction_copies(
        tiny_llama_dir: Path, class_name: str) -> None:
    """The vocabulary and merges these classes keep after building their Rust tokenizer are
    dropped at load (62 MB on the default model); encoding, decoding, the vocabulary, the chat
    template and saving do not change."""

    tokenizer = getattr(transformers, class_name).from_pretrained(tiny_llama_dir)
    texts = ["def add(a, b):\n    return a + b", "héllo wörld 世界 🙂", "<|im_start|>user"]
    messages = [{"role": "user", "content": "hi"}]

    def behaviour() -> tuple[object, ...]:
        ids = [tokenizer.encode(text) for text in texts]
        return (ids, [tokenizer.decode(i) for i in ids], tokenizer.get_vocab(), len(tokenizer),
                tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True))

    before = behaviour()
    assert hasattr(tokenizer, "_vocab") and hasattr(tokenizer, "_merges")
    assert drop_construction_copies(tokenizer) == 2
    assert not hasattr(tokenizer, "_vocab") and not hasattr(tokenizer, "_merges")
    assert behaviour() == before
    with tempfile.TemporaryDirectory() as saved:
        tokenizer.save_pretrained(saved)
        reloaded = transformers.AutoTokenizer.from_pretrained(saved)
        assert [reloaded.encode(text) for text in texts] == before[0]


def test_other_tokenizer_classes_keep_their_attributes(tiny_llama_dir: Path) -> None:

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert type(tokenizer).__name__ not in ("GPT2Tokenizer", "LlamaTokenizer", "Qwen2Tokenizer")
    tokenizer._vocab = {"kept": 0}  # a class outside the list may still read its own
    assert drop_construction_copies(tokenizer) == 0 and tokenizer._vocab == {"kept": 0}
