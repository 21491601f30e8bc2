"""bench/serve.py, bench/edit_workload.py and bench/compare.py's parsing: the edit workload is
seeded, valid Python near its token target; edit requests stop on their own unless a length is
forced; spec-decode counters are read from Prometheus text and diffed; scenarios and variants
(a JSON flag value in quotes included) parse as documented."""

from __future__ import annotations

import ast
import json
import math

import pytest

from bench.compare import Scenario, parse_scenarios, parse_variant
from bench.edit_workload import edit_tasks
from bench.serve import (
    LoadConfig,
    Prompt,
    build_prompts,
    default_output_tokens,
    parse_spec_counters,
    request_body,
    spec_decode_delta,
)
from tests.tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return build_tokenizer()


class _WordTokenizer:
    """One token per whitespace-separated word: file sizes the test can reason about."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [0] * len(text.split())


# ---------------------------------------------------------------------------- the edit workload


def test_edit_tasks_are_seeded_varied_python() -> None:
    tasks = edit_tasks(_WordTokenizer(), 12, 200, seed=3)
    assert tasks == edit_tasks(_WordTokenizer(), 12, 200, seed=3)
    assert tasks[:5] == edit_tasks(_WordTokenizer(), 5, 200, seed=3)  # a prefix of a longer run
    assert tasks != edit_tasks(_WordTokenizer(), 12, 200, seed=4)
    assert len({task.code for task in tasks}) == len(tasks)
    for task in tasks:
        ast.parse(task.code)
        assert task.code.endswith("\n") and "def " in task.code and '"""' in task.code
        assert task.instruction.split()[0] in ("In", "Rename", "Change", "Add")
        assert f"```python\n{task.code}```" in task.prompt()
        assert 0.5 * 200 <= task.num_code_tokens <= 1.15 * 200


def test_edit_requests_stop_on_their_own_unless_forced(tokenizer) -> None:  # noqa: ANN001
    config = LoadConfig(url="", workload="edit", num_requests=3, file_tokens=300,
                        output_tokens=default_output_tokens("edit", None))
    prompts = build_prompts(tokenizer, config)
    tasks = edit_tasks(tokenizer, 3, 300, seed=0)
    assert [p.max_tokens for p in prompts] == [math.ceil(1.3 * t.num_code_tokens)
                                               for t in tasks]
    assert not any(p.is_forced for p in prompts)
    body = request_body(config, prompts[0])
    assert "ignore_eos" not in body and "min_tokens" not in body
    assert body["messages"] == [{"role": "user", "content": tasks[0].prompt()}]
    config.output_tokens = 50
    body = request_body(config, build_prompts(tokenizer, config)[0])  # forced: as in chat
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (50, 50, True)


def test_chat_requests_keep_their_exact_length(tokenizer) -> None:  # noqa: ANN001
    config = LoadConfig(url="", num_requests=2, output_tokens=default_output_tokens("chat", None))
    prompt = build_prompts(tokenizer, config)[0]
    assert prompt.is_forced and prompt.max_tokens == 128
    body = request_body(config, prompt)
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (128, 128, True)
    body = request_body(LoadConfig(url="", endpoint="completions"), Prompt("hi", 4, False))
    assert body["prompt"] == "hi" and "ignore_eos" not in body


# ------------------------------------------------------------------------- spec-decode counters

_METRICS = """\
# HELP pagedserve_spec_decode_num_drafts_total Speculative decoding: verifications.
# TYPE pagedserve_spec_decode_num_drafts_total counter
pagedserve_spec_decode_num_drafts_total{model_name="a b}"} 10.0
pagedserve_spec_decode_num_drafts_created{model_name="a b}"} 1.7e+09
pagedserve_spec_decode_num_draft_tokens_total{model_name="a b}"} 50.0
pagedserve_spec_decode_num_accepted_tokens_total{model_name="a b}"} 20.0
pagedserve_spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"} 9.0
pagedserve_generation_tokens_total{model_name="m"} 999.0
"""


def test_spec_counters_are_summed_over_labels_and_diffed() -> None:
    before = parse_spec_counters(_METRICS)
    assert before == {"num_drafts": 10.0, "num_draft_tokens": 50.0, "num_accepted_tokens": 20.0}
    after = parse_spec_counters(_METRICS + 'pagedserve_spec_decode_num_drafts_total{model_name='
                                '"other"} 4\npagedserve_spec_decode_num_draft_tokens_total 10\n'
                                "pagedserve_spec_decode_num_accepted_tokens_total 8 1700000000\n")
    delta = spec_decode_delta(before, after)
    assert delta == {"num_drafts": 4.0, "num_draft_tokens": 10.0, "num_accepted_tokens": 8.0,
                     "acceptance_rate": 0.8, "mean_accepted_length": 3.0}


def test_spec_counters_under_vllm_names_count_once() -> None:
    """A vLLM server (or ours with --metrics-names vllm) has only vLLM's names; ours with
    `both` counts every event under each name, which must not count twice."""
    vllm = _METRICS.replace("pagedserve_", "vllm:")
    assert parse_spec_counters(vllm) == parse_spec_counters(_METRICS)
    assert parse_spec_counters(_METRICS + vllm) == parse_spec_counters(_METRICS)


def test_absent_or_idle_spec_counters() -> None:
    assert parse_spec_counters("pagedserve_generation_tokens_total 3\n") is None
    assert spec_decode_delta(None, None) is None
    idle = parse_spec_counters(_METRICS)
    assert spec_decode_delta(idle, idle) == {
        "num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0,
        "acceptance_rate": None, "mean_accepted_length": None}


# ------------------------------------------------------------------------ compare's arguments


def test_scenarios_name_their_workload() -> None:
    assert parse_scenarios("edit:1:8,1:4,chat:16") == [
        Scenario("edit", 1, 8), Scenario("chat", 1, 4), Scenario("chat", 16, 64)]
    assert parse_scenarios("1", default_workload="edit") == [Scenario("edit", 1, 4)]
    assert [s.key for s in parse_scenarios("edit:1:2,chat:1:2")] == ["edit c1", "chat c1"]
    for bad in ("foo:1", "1:2:3", "edit", "1:2,1:3"):
        with pytest.raises(ValueError):
            parse_scenarios(bad)


def test_variant_flags_keep_a_quoted_json_value_whole() -> None:
    spec = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2}
    name, flags = parse_variant(f"ngram=--speculative-config '{json.dumps(spec)}' --seed 1")
    assert name == "ngram" and flags[0] == "--speculative-config" and flags[2:] == ["--seed", "1"]
    assert json.loads(flags[1]) == spec
    assert parse_variant("base=") == ("base", [])
    assert parse_variant("int8=--quantization int8") == ("int8", ["--quantization", "int8"])
    for bad in ("noflags", "=--seed 1", "x=--speculative-config '{unclosed"):
        with pytest.raises(ValueError):
            parse_variant(bad)
