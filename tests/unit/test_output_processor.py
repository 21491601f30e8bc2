"""OutputProcessor driven with EngineCoreOutput values: DELTA, CUMULATIVE and FINAL_ONLY
outputs, num_tokens, logprobs, stop strings across tokens, n > 1 choices merged into one
output, abort and error from outside a step, and a processing fault that fails one request."""

from __future__ import annotations

import pytest

from engine.fault_hooks import FaultHooks
from engine.output_processor import OutputProcessor, ProcessedStep
from engine.outputs import EngineCoreOutput, Logprob, RequestOutput, RequestOutputKind
from engine.sampling_params import SamplingParams
from tests.fake_runner import tokenizer

PROMPT = tokenizer().encode("The")
WORDS = [" quick", " brown", " fox", " jumps"]
WORD_IDS = [tokenizer().encode(word)[0] for word in WORDS]  # one token each
ARRIVAL = 100.0


def _processor(fault_hooks: FaultHooks | None = None) -> OutputProcessor:
    return OutputProcessor(tokenizer(), fault_hooks)


def _add(processor: OutputProcessor, request_id: str, kind: RequestOutputKind, n: int = 1,
         **params: object) -> list[str]:
    sequence_ids = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
    processor.add_request(request_id, sequence_ids, PROMPT,
                          SamplingParams(n=n, output_kind=kind, **params),  # type: ignore[arg-type]
                          ARRIVAL)
    return sequence_ids


def _token(sequence_id: str, index: int, finish_reason: str | None = None,
           **fields: object) -> EngineCoreOutput:
    """The core's output for WORDS[index], sampled at time 101 + index."""
    return EngineCoreOutput(sequence_id, [WORD_IDS[index]], finish_reason=finish_reason,
                            time=101.0 + index, **fields)  # type: ignore[arg-type]


def _feed(processor: OutputProcessor, sequence_id: str, num_words: int,
          finish_reason: str | None = "length") -> list[ProcessedStep]:
    """One word a step; the last step carries `finish_reason`."""
    return [processor.process([_token(sequence_id, i, finish_reason
                                      if i == num_words - 1 else None)])
            for i in range(num_words)]


def _only(step: ProcessedStep) -> RequestOutput:
    [output] = step.outputs
    return output


# ---- the three output kinds ---------------------------------------------------------------


def test_delta_outputs_hold_only_what_the_step_added() -> None:
    processor = _processor()
    _add(processor, "r", RequestOutputKind.DELTA)
    outputs = [_only(step) for step in _feed(processor, "r", 4)]
    choices = [output.outputs[0] for output in outputs]
    assert [c.token_ids for c in choices] == [[t] for t in WORD_IDS]
    assert [c.text for c in choices] == WORDS
    assert [c.num_tokens for c in choices] == [1, 2, 3, 4]  # counted whatever the kind
    assert [c.finish_reason for c in choices] == [None, None, None, "length"]
    assert [o.finished for o in outputs] == [False, False, False, True]
    assert processor.num_unfinished_requests == 0  # forgotten once finished


def test_cumulative_outputs_hold_everything_so_far_as_copies() -> None:
    processor = _processor()
    _add(processor, "r", RequestOutputKind.CUMULATIVE)
    first = _only(processor.process([_token("r", 0)])).outputs[0]
    first.token_ids.append(-1)  # a caller may keep and change what it got
    second = _only(processor.process([_token("r", 1)])).outputs[0]
    assert second.token_ids == WORD_IDS[:2] and second.text == "".join(WORDS[:2])
    assert second.num_tokens == 2
    last = _only(processor.process([_token("r", 2, "length")])).outputs[0]
    assert last.token_ids == WORD_IDS[:3] and last.text == "".join(WORDS[:3])
    assert last.finish_reason == "length"


def test_final_only_is_one_output_holding_everything() -> None:
    processor = _processor()
    _add(processor, "r", RequestOutputKind.FINAL_ONLY, logprobs=1)
    steps = [processor.process([_token("r", i, "length" if i == 2 else None,
                                       first_scheduled_time=100.5,
                                       new_logprobs=[_logprobs(i)])]) for i in range(3)]
    assert [len(step.outputs) for step in steps] == [0, 0, 1]
    output = _only(steps[-1])
    [choice] = output.outputs
    assert choice.token_ids == WORD_IDS[:3] and choice.text == "".join(WORDS[:3])
    assert choice.num_tokens == 3 and output.finished
    assert choice.logprobs is not None and len(choice.logprobs) == 3
    # one entry per token id, decoded: the sampled token (also the top 1) and the runner-up
    assert choice.logprobs[0] == {WORD_IDS[0]: Logprob(-0.25, 1, WORDS[0]),
                                  WORD_IDS[3]: Logprob(-1.25, 2, WORDS[3])}
    timing = output.timing
    assert (timing.arrival, timing.first_scheduled) == (ARRIVAL, 100.5)
    assert (timing.first_token, timing.last_token) == (101.0, 103.0)
    assert timing.finished is not None


def _logprobs(index: int) -> list[tuple[int, float, int]]:
    """The sampled WORDS[index], then a top-2 of itself and WORDS[3]."""
    return [(WORD_IDS[index], -0.25, 1), (WORD_IDS[index], -0.25, 1), (WORD_IDS[3], -1.25, 2)]


# ---- stop strings -------------------------------------------------------------------------


@pytest.mark.parametrize(("include", "text"), [(False, " quick brow"),
                                               (True, " quick brown fox")])
def test_a_stop_string_across_tokens_ends_the_choice(include: bool, text: str) -> None:
    processor = _processor()
    _add(processor, "r", RequestOutputKind.DELTA, stop=("n fox",),
         include_stop_str_in_output=include)
    steps = [processor.process([_token("r", i)]) for i in range(3)]
    deltas = [_only(step).outputs[0] for step in steps]
    if not include:  # " brown" may still begin "n fox": its "n" waits
        assert [d.text for d in deltas[:2]] == [" quick", " brow"]
    assert "".join(d.text for d in deltas) == text
    last = deltas[-1]
    assert (last.finish_reason, last.stop_reason) == ("stop", "n fox")
    assert last.num_tokens == 3
    assert steps[-1].stopped == ["r"]  # the core still runs it: the engine finishes it there
    assert processor.process([_token("r", 3)]).outputs == []  # later tokens are dropped


# ---- n > 1 --------------------------------------------------------------------------------


def test_n_choices_merge_into_one_output_per_step() -> None:
    processor = _processor()
    first, second = _add(processor, "r", RequestOutputKind.DELTA, n=2)
    both = _only(processor.process([_token(first, 0, num_cached_tokens=4),
                                    _token(second, 1, num_cached_tokens=0)]))
    assert [(c.index, c.token_ids) for c in both.outputs] == [(0, [WORD_IDS[0]]),
                                                              (1, [WORD_IDS[1]])]
    assert both.num_cached_tokens == 4  # the first choice's prompt hit
    one_ends = _only(processor.process([_token(first, 2, "length")]))
    assert [c.token_ids for c in one_ends.outputs] == [[WORD_IDS[2]], []]
    assert [c.finish_reason for c in one_ends.outputs] == ["length", None]
    assert not one_ends.finished  # a request ends when every choice has
    last = _only(processor.process([_token(second, 3, "length")]))
    assert last.finished and [c.num_tokens for c in last.outputs] == [2, 2]
    assert (last.timing.first_token, last.timing.last_token) == (101.0, 104.0)


# ---- finishing from outside a step --------------------------------------------------------


def test_abort_flushes_held_text_and_error_does_not() -> None:
    processor = _processor()
    _add(processor, "aborted", RequestOutputKind.DELTA, stop=("n fox",))
    _add(processor, "failed", RequestOutputKind.DELTA, stop=("n fox",))
    for sequence_id in ("aborted", "failed"):
        _feed(processor, sequence_id, 2, finish_reason=None)  # " quick brow", "n" held
    [aborted] = processor.finish_sequences(["aborted"], "abort")
    assert aborted.finished and aborted.error is None
    assert (aborted.outputs[0].finish_reason, aborted.outputs[0].text) == ("abort", "n")
    [failed] = processor.finish_sequences(["failed"], "error", "the pass broke")
    assert failed.finished and failed.error == "the pass broke"
    assert (failed.outputs[0].finish_reason, failed.outputs[0].text) == ("error", "")
    assert processor.num_unfinished_requests == 0
    assert processor.finish_sequences(["aborted"], "abort") == []  # idempotent


def test_finishing_one_choice_of_several_leaves_the_request_open() -> None:
    processor = _processor()
    first, second = _add(processor, "r", RequestOutputKind.CUMULATIVE, n=2)
    [output] = processor.finish_sequences([first], "abort")
    assert not output.finished
    assert [c.finish_reason for c in output.outputs] == ["abort", None]
    assert processor.sequence_ids("r") == [first, second]


def test_a_processing_fault_fails_only_its_request() -> None:
    def break_bad(request_id: str, prompt: list[int], num_tokens: int) -> None:
        if request_id == "bad" and num_tokens >= 2:
            raise RuntimeError("injected processing fault")

    processor = _processor(FaultHooks(on_request_output=break_bad))
    _add(processor, "good", RequestOutputKind.DELTA)
    _add(processor, "bad", RequestOutputKind.DELTA)
    first = processor.process([_token("good", 0), _token("bad", 0)])
    assert [o.request_id for o in first.outputs] == ["good", "bad"] and not first.failed
    second = processor.process([_token("good", 1), _token("bad", 1)])
    assert [o.request_id for o in second.outputs] == ["good"]
    assert second.failed == {"bad": "processing the output failed: "
                                    "RuntimeError('injected processing fault')"}
    assert second.outputs[0].outputs[0].token_ids == [WORD_IDS[1]]
    # the engine then fails it: one finished output carrying the error
    [failed] = processor.finish_sequences(["bad"], "error", second.failed["bad"])
    assert failed.finished and failed.outputs[0].finish_reason == "error"
    assert processor.sequence_ids("good") == ["good"]
