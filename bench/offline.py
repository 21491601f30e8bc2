"""Offline throughput: pagedserve's LLM.generate against transformers' generate, same run.

    python bench/offline.py [--model DIR] [--num-prompts 32] [--max-tokens 128] [--dtype bfloat16]
                            [--quantization int8]

Both sides get the same chat prompts and generate exactly --max-tokens tokens each (EOS is
masked until then). transformers runs one padded batch; pagedserve schedules continuously.
Also times single-request decode on both. Prints tokens/s and the ratios; --json writes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import transformers

from engine import LLM, SamplingParams

QUESTIONS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a SQL query that returns the ten most recent orders per customer.",
    "How do I reverse a linked list in C? Show the code.",
    "Write a bash one-liner that counts lines in all .py files recursively.",
    "What does the `yield` keyword do in Python? Give an example.",
    "Implement binary search in JavaScript.",
    "Write a Rust function that parses a comma-separated list of integers.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model directory (default: the embedded default model)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--quantization", default=None, choices=["int8"],
                        help="pagedserve's weight quantization (transformers stays in --dtype)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-transformers", action="store_true",
                        help="time pagedserve only")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    return parser.parse_args()


def model_dir(model: str | None) -> str:
    if model is not None:
        return model
    from engine.default_model import ensure_default_model

    return str(ensure_default_model())


def chat_prompts(tokenizer: transformers.PreTrainedTokenizerBase, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        messages = [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}]
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False))
    return prompts


def time_pagedserve(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def time_transformers(model: transformers.PreTrainedModel, tokenizer: transformers.
                      PreTrainedTokenizerBase, prompts: list[list[int]],
                      max_tokens: int) -> tuple[float, int]:
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        generated = model.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                                   max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                   pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    return elapsed, (generated.shape[1] - width) * len(prompts)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    path = model_dir(args.model)
    llm = LLM(path, dtype=args.dtype, quantization=args.quantization)
    prompts = chat_prompts(llm.tokenizer, args.num_prompts)
    time_pagedserve(llm, prompts[:2], 4)  # warm-up
    results: dict[str, float] = {}
    elapsed, tokens = time_pagedserve(llm, prompts, args.max_tokens)
    results["pagedserve_batch_tok_s"] = tokens / elapsed
    elapsed, tokens = time_pagedserve(llm, prompts[:1], args.max_tokens)
    results["pagedserve_single_tok_s"] = tokens / elapsed
    if not args.skip_transformers:
        dtype = getattr(torch, args.dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        elapsed, tokens = time_transformers(model, llm.tokenizer, prompts, args.max_tokens)
        results["transformers_batch_tok_s"] = tokens / elapsed
        elapsed, tokens = time_transformers(model, llm.tokenizer, prompts[:1], args.max_tokens)
        results["transformers_single_tok_s"] = tokens / elapsed
        results["batch_ratio"] = (results["pagedserve_batch_tok_s"]
                                  / results["transformers_batch_tok_s"])
        results["single_ratio"] = (results["pagedserve_single_tok_s"]
                                   / results["transformers_single_tok_s"])
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, float]) -> None:
    quantized = f", pagedserve weights {args.quantization}" if args.quantization else ""
    print(f"{args.num_prompts} prompts x {args.max_tokens} tokens, {args.dtype}{quantized}, "
          f"{args.threads} threads")
    for name, value in results.items():
        print(f"  {name:28s} {value:10.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
