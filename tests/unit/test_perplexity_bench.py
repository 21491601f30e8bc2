"""bench/perplexity.py: its sliding windows score every token but the first exactly once, it
reads vLLM's prompt_logprobs format, and its transformers reference equals a direct
full-sequence computation; the API path is checked against a fake server whose logprobs come
from the same tiny model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from bench.perplexity import (
    PromptLogprobs,
    Window,
    perplexity,
    plan_windows,
    reference_score,
    server_score,
    tokenize,
    window_nll,
)
from tests.tiny_models import VOCAB_SIZE, save_tiny_model

# ---------------------------------------------------------------------------------- windowing


def test_windows_follow_the_guide() -> None:
    # 10 tokens, windows of 4 every 2: each scores what the previous one did not reach
    assert plan_windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6),
                                      Window(6, 10, 8)]
    assert plan_windows(3, 8, 4) == [Window(0, 3, 1)]  # one window covers a short text


@given(num_tokens=st.integers(1, 300), max_length=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_but_the_first_once(num_tokens: int, max_length: int,
                                                      data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, max_length - 1))
    windows = plan_windows(num_tokens, max_length, stride)
    scored = [p for w in windows for p in range(w.score_start, w.end)]
    assert scored == list(range(1, num_tokens))
    assert sum(w.num_scored for w in windows) == num_tokens - 1
    assert windows[0].begin == 0 and windows[-1].end == num_tokens  # they cover the text
    for index, window in enumerate(windows):
        assert window.begin == index * stride
        assert 0 < window.end - window.begin <= max_length
        assert window.begin < window.score_start <= window.end  # context before every score


def test_disjoint_windows_cannot_score_their_first_token() -> None:
    # stride == max_length: no window has context for its first token
    windows = plan_windows(10, 4, 4)
    assert [(w.begin, w.end, w.score_start) for w in windows] == [(0, 4, 1), (4, 8, 5),
                                                                 (8, 10, 9)]
    assert sum(w.num_scored for w in windows) == 10 - len(windows)


@pytest.mark.parametrize(("max_length", "stride"), [(4, 0), (4, 5), (1, 1)])
def test_windows_refuse_bad_arguments(max_length: int, stride: int) -> None:
    with pytest.raises(ValueError):
        plan_windows(10, max_length, stride)


def test_window_nll_reads_the_prompt_token_entry() -> None:
    token_ids = [7, 8, 9, 10]
    window = Window(1, 4, 2)  # prompt is [8, 9, 10]; scores 9 and 10
    prompt_logprobs: PromptLogprobs = [
        None,
        {"9": {"logprob": -0.5, "rank": 1, "decoded_token": "a"},
         "3": {"logprob": -0.1, "rank": 1, "decoded_token": "b"}},
        {"5": {"logprob": -0.2, "rank": 1, "decoded_token": "c"},
         "10": {"logprob": -2.0, "rank": 4, "decoded_token": "d"}},
    ]
    assert window_nll(prompt_logprobs, token_ids, window) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="no prompt logprob"):
        window_nll([None, None, {"10": {"logprob": -1.0}}], token_ids, window)
    with pytest.raises(ValueError, match="entries"):
        window_nll([None, None], token_ids, window)


# ---------------------------------------------------------------------- transformers reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("perplexity") / "llama")


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                             dtype=torch.float32).eval()


def _token_ids(num_tokens: int) -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(num_tokens)]


def _logprobs(model: transformers.PreTrainedModel, token_ids: list[int]) -> torch.Tensor:
    """log p(token_ids[i] | token_ids[:i]) for i >= 1, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, :-1]  # [num_tokens - 1, vocab_size]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return logprobs.gather(1, torch.tensor(token_ids[1:]).unsqueeze(1)).squeeze(1)


def test_reference_equals_a_full_sequence_computation(
        model_dir: Path, hf_model: transformers.PreTrainedModel) -> None:
    token_ids = _token_ids(200)
    windows = plan_windows(len(token_ids), 256, 128)
    assert len(windows) == 1
    score = reference_score(model_dir, token_ids, windows)
    direct_nll = -float(_logprobs(hf_model, token_ids).sum())
    assert score.num_scored == len(token_ids) - 1
    assert score.total_nll == pytest.approx(direct_nll, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(direct_nll / 199), rel=1e-5)


# -------------------------------------------------------------------- the API path, faked


def _fake_server(model: transformers.PreTrainedModel) -> httpx.MockTransport:
    """/v1/completions answering prompt_logprobs in vLLM's format from `model`; /tokenize
    refusing texts over 40 characters as too long, one token per character otherwise."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/tokenize":
            if len(body["prompt"]) > 40:
                return httpx.Response(400, json={"error": {
                    "message": "too long", "type": "invalid_request_error",
                    "param": "prompt", "code": "context_length_exceeded"}})
            return httpx.Response(200, json={"tokens": [ord(c) for c in body["prompt"]]})
        assert body["max_tokens"] == 1 and body["prompt_logprobs"] == 0
        prompt = body["prompt"]
        entries = [None] + [{str(token): {"logprob": float(logprob), "rank": 1,
                                          "decoded_token": "x"}}
                            for token, logprob in zip(prompt[1:], _logprobs(model, prompt),
                                                      strict=True)]
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "x",
                                                      "prompt_logprobs": entries}]})

    return httpx.MockTransport(handle)


def test_server_score_matches_the_reference_over_windows(
        model_dir: Path, hf_model: transformers.PreTrainedModel) -> None:
    token_ids = _token_ids(300)
    windows = plan_windows(len(token_ids), 128, 48)
    assert len(windows) > 3
    with httpx.Client(transport=_fake_server(hf_model), base_url="http://fake") as http:
        served = server_score(http, "tiny", token_ids, windows)
    reference = reference_score(model_dir, token_ids, windows)
    assert served.num_scored == reference.num_scored == len(token_ids) - 1
    assert served.perplexity == pytest.approx(reference.perplexity, rel=1e-5)
    assert perplexity(served.total_nll, served.num_scored) == served.perplexity


def test_a_text_longer_than_the_context_is_tokenized_by_paragraph(
        hf_model: transformers.PreTrainedModel) -> None:
    text = "first paragraph, some words\n\nsecond paragraph, more words\n\nthird"
    with httpx.Client(transport=_fake_server(hf_model), base_url="http://fake") as http:
        assert tokenize(http, "tiny", text) == [ord(c) for c in text]
        assert tokenize(http, "tiny", "short") == [ord(c) for c in "short"]
