"""Perplexity of a served model over a text, measured through the API, as the transformers
perplexity guide computes it (https://huggingface.co/docs/transformers/perplexity).

    python bench/perplexity.py bench/data/perplexity.txt --url http://127.0.0.1:8000
        [--max-length N] [--stride N] [--model NAME] [--reference MODEL_DIR] [--json]
        [--api-key KEY]

Method. The text is tokenized by the server's own POST /tokenize (no special tokens), so the
server and the reference score the very same token ids. A model sees at most `max_length`
tokens at once, so the ids are scored in sliding windows: window k covers
[k * stride, k * stride + max_length) and scores only the tokens after the previous window's
end (trg_len = end - prev_end in the guide); the tokens before them are context. Every token
but the first (which has nothing to be predicted from) is scored exactly once, as long as
stride < max_length. Each window is one POST /v1/completions with its token ids as the prompt,
max_tokens 1, temperature 0 and prompt_logprobs 0: choices[0].prompt_logprobs holds, for every
prompt token after the first, a dict keyed by token id (as a string) whose entry for the
prompt's own token carries its logprob (vLLM's format). Perplexity is
exp(total negative log-likelihood / number of scored tokens).

--reference MODEL_DIR computes the same windows over the same ids with transformers
(AutoModelForCausalLM in fp32, `labels` set to -100 where a window does not score, as the
guide does), counting the scored tokens exactly (the guide subtracts one per window, one too
many for each window that overlaps the one before), and prints both perplexities and their
relative difference.

The default --max-length is the server's max_model_len minus one: a completion must leave
room for the one token it generates. The default --stride is the guide's 512, or half the
window when the window is not longer than that; with stride == max_length the windows do not
overlap and each window's first token goes unscored. A text longer than the server's context
is tokenized paragraph by paragraph (token ids at the seams may differ from one pass; both
sides still score the same ids).

bench/data/perplexity.txt is this project's own documentation (README.md and
docs/architecture.md) rewritten as plain prose, under the project's license; about 3,500
tokens for a Qwen2.5 tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

DEFAULT_STRIDE = 512  # the guide's; halved when the window is not longer than it
PARAGRAPH_BREAK = "\n\n"

# vLLM's prompt_logprobs: per prompt token, None (the first) or {"<token id>": {"logprob", ...}}
PromptLogprobs = Sequence[Mapping[str, Mapping[str, float | int | str]] | None]


# ------------------------------------------------------------------ windowing (pure functions)


@dataclass(frozen=True, slots=True)
class Window:
    """Token positions [begin, end) fed to the model; [score_start, end) are scored."""

    begin: int
    end: int
    score_start: int

    @property
    def num_scored(self) -> int:
        return self.end - self.score_start


def plan_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The guide's sliding windows over `num_tokens` ids. A window scores from the previous
    window's end, but never its own first position: a token needs a token before it."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def perplexity(total_nll: float, num_scored: int) -> float:
    return math.exp(total_nll / num_scored)


def window_nll(prompt_logprobs: PromptLogprobs, token_ids: Sequence[int], window: Window) -> float:
    """The summed negative logprob of the window's scored tokens, read from a completion's
    prompt_logprobs (one entry per prompt token, the window's ids as the prompt)."""
    if len(prompt_logprobs) != window.end - window.begin:
        raise ValueError(f"prompt_logprobs has {len(prompt_logprobs)} entries for a "
                         f"{window.end - window.begin}-token prompt")
    total = 0.0
    for position in range(window.score_start, window.end):
        entry = prompt_logprobs[position - window.begin]
        token = str(token_ids[position])
        if entry is None or token not in entry:
            raise ValueError(f"no prompt logprob for token {token} at position {position}")
        total -= float(entry[token]["logprob"])
    return total


# ------------------------------------------------------------------------------ through the API


@dataclass(frozen=True, slots=True)
class Score:
    total_nll: float
    num_scored: int

    @property
    def perplexity(self) -> float:
        return perplexity(self.total_nll, self.num_scored)


def served_model(http: httpx.Client) -> tuple[str, int]:
    """The first model /v1/models lists, and its context length."""
    card = _ok(http.get("/v1/models")).json()["data"][0]
    return str(card["id"]), int(card["max_model_len"])


def tokenize(http: httpx.Client, model: str, text: str) -> list[int]:
    """The server's token ids for `text`, in one pass when it fits the context, else one pass
    per paragraph (the server refuses a text longer than its context)."""
    response = _post_tokenize(http, model, text)
    if not _is_too_long(response) or PARAGRAPH_BREAK not in text:
        return list(_ok(response).json()["tokens"])
    print("the text is longer than the context: tokenizing it paragraph by paragraph",
          file=sys.stderr)
    paragraphs = text.split(PARAGRAPH_BREAK)
    pieces = [p + PARAGRAPH_BREAK for p in paragraphs[:-1]] + [paragraphs[-1]]
    return [token for piece in pieces if piece
            for token in _ok(_post_tokenize(http, model, piece)).json()["tokens"]]


def _is_too_long(response: httpx.Response) -> bool:
    return response.status_code == 400 and \
        response.json().get("error", {}).get("code") == "context_length_exceeded"


def _post_tokenize(http: httpx.Client, model: str, text: str) -> httpx.Response:
    return http.post("/tokenize", json={"model": model, "prompt": text,
                                        "add_special_tokens": False})


def server_score(http: httpx.Client, model: str, token_ids: Sequence[int],
                 windows: Sequence[Window]) -> Score:
    """One completion per window, its prompt_logprobs summed over the scored positions."""
    total_nll = 0.0
    for window in windows:
        body = {"model": model, "prompt": list(token_ids[window.begin:window.end]),
                "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
        choice = _ok(http.post("/v1/completions", json=body)).json()["choices"][0]
        if choice.get("prompt_logprobs") is None:
            raise SystemExit("the server returned no prompt_logprobs")
        total_nll += window_nll(choice["prompt_logprobs"], token_ids, window)
    return Score(total_nll, sum(window.num_scored for window in windows))


def _ok(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise SystemExit(f"{response.request.method} {response.request.url.path}: "
                         f"{response.status_code} {response.text[:500]}")
    return response


# ---------------------------------------------------------------------- transformers reference


def reference_score(model_dir: str | Path, token_ids: Sequence[int],
                    windows: Sequence[Window]) -> Score:
    """The same windows through transformers in fp32: `labels` -100 where a window only gives
    context, the model's mean loss times the number of labels it actually scored."""
    import torch  # the API path needs neither torch nor transformers
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    total_nll = 0.0
    num_scored = 0
    for window in windows:
        input_ids = torch.tensor([token_ids[window.begin:window.end]])  # [1, num_tokens]
        labels = input_ids.clone()
        labels[:, :window.score_start - window.begin] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        # the model shifts labels left by one: the window's first label is never scored
        num_labels = int((labels[:, 1:] != -100).sum())
        assert num_labels == window.num_scored  # plan_windows never scores a window's first
        total_nll += float(loss) * num_labels
        num_scored += num_labels
    return Score(total_nll, num_scored)


# ------------------------------------------------------------------------------------ the script


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("file", type=Path, help="UTF-8 text to score")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per window (default: the server's max_model_len - 1)")
    parser.add_argument("--stride", type=int, default=None,
                        help=f"tokens between window starts (default: {DEFAULT_STRIDE}, or half "
                             "of --max-length when that is not longer); below --max-length, "
                             "every token but the first is scored")
    parser.add_argument("--model", default=None,
                        help="model name in requests (default: the first of /v1/models)")
    parser.add_argument("--reference", default=None, metavar="MODEL_DIR",
                        help="also compute it with transformers from this HF model directory")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as http:
        first_model, max_model_len = served_model(http)
        model = args.model or first_model
        token_ids = tokenize(http, model, args.file.read_text(encoding="utf-8"))
        max_length = args.max_length or max_model_len - 1
        stride = args.stride or min(DEFAULT_STRIDE, max(max_length // 2, 1))
        try:
            windows = plan_windows(len(token_ids), max_length, stride)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        if len(token_ids) < 2:
            raise SystemExit(f"{args.file} has {len(token_ids)} token(s): nothing to score")
        served = server_score(http, model, token_ids, windows)
    report: dict[str, object] = {
        "file": str(args.file), "model": model, "num_tokens": len(token_ids),
        "max_length": max_length, "stride": stride, "num_windows": len(windows),
        "server": {**asdict(served), "perplexity": served.perplexity}}
    if args.reference:
        reference = reference_score(args.reference, token_ids, windows)
        report["reference"] = {**asdict(reference), "perplexity": reference.perplexity,
                               "model_dir": args.reference}
        report["relative_difference"] = served.perplexity / reference.perplexity - 1
    print(json.dumps(report, indent=2) if args.json else _text_report(report))
    return 0


def _text_report(report: Mapping[str, object]) -> str:
    served = report["server"]
    assert isinstance(served, Mapping)
    lines = [f"{report['file']}: {report['num_tokens']} tokens, {report['num_windows']} "
             f"window(s) of {report['max_length']} (stride {report['stride']}), "
             f"{served['num_scored']} scored",
             f"server ({report['model']}): perplexity {served['perplexity']:.4f}"]
    reference = report.get("reference")
    if isinstance(reference, Mapping):
        lines.append(f"transformers ({reference['model_dir']}): perplexity "
                     f"{reference['perplexity']:.4f}")
        lines.append(f"relative difference: {report['relative_difference']:+.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
