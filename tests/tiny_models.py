"""Tiny random-weight checkpoints of every supported architecture, saved the way the hub
ships them (config.json, safetensors, tokenizer files), so tests exercise the real loaders."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DENSE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES
VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching lets new requests join a running batch at every step.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Hello, world! How are you today? I am fine, thank you.",
    "1234567890 + - * / = ( ) [ ] { } < > ; : , . ! ?",
    "日本語のテキスト、中文文本，한국어 텍스트 🙂🚀✨",
]


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with VOCAB_SIZE entries and ChatML-style special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token=None,
        pad_token="<|endoftext|>", unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(arch: str, **overrides: object) -> transformers.PretrainedConfig:
    """A small config of `arch`; initializer_range 0.2 so greedy outputs vary."""
    common: dict[str, object] = dict(vocab_size=VOCAB_SIZE, initializer_range=0.2)
    if arch == "gpt2":
        kwargs = dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0,
                      eos_token_id=2, **common)
        kwargs.update(overrides)
        return transformers.GPT2Config(**kwargs)
    kwargs = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, **common,
    )
    klass = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
             "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
             "mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
             "qwen3_moe": transformers.Qwen3MoeConfig}[arch]
    if arch in ("qwen3", "qwen3_moe"):
        kwargs["head_dim"] = 16
    if arch == "mixtral":
        kwargs.update(num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":  # layer 1 dense: Qwen2-MoE mixes sparse and dense layers
        kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=96, mlp_only_layers=[1])
    if arch == "qwen3_moe":
        kwargs.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True)
    kwargs.update(overrides)
    return klass(**kwargs)


def save_tiny_model(arch: str, path: Path, seed: int | None = None, **overrides: object) -> Path:
    """Build a random-weight fp32 model of `arch`, save weights + tokenizer to `path`."""
    config = build_config(arch, **overrides)
    torch.manual_seed(ARCHITECTURES.index(arch) if seed is None else seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    return path


def greedy_reference(model: transformers.PreTrainedModel, prompts: list[list[int]],
                     num_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy generate, one prompt at a time, exactly num_new_tokens each
    (EOS masked until then, as min_tokens does in the engine): the reference outputs."""
    outputs = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt])
        generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=num_new_tokens, min_new_tokens=num_new_tokens,
                                   do_sample=False, pad_token_id=0)
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs
