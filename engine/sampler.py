"""Sampling: pure functions from one step's logits and per-request settings to token ids."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.kernels.native import native_library
from engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplingMetadata:
    """One step's sampling settings as batch tensors; a field is None when no row uses it."""

    temperature: Tensor  # [num_seqs] float32; 0 rows are greedy, others >= GREEDY_TEMPERATURE
    top_k: Tensor | None  # [num_seqs] int64; vocab_size where disabled
    top_p: Tensor | None  # [num_seqs] float32
    min_p: Tensor | None  # [num_seqs] float32
    repetition_penalties: Tensor | None  # [num_seqs] float32
    presence_penalties: Tensor | None  # [num_seqs] float32
    frequency_penalties: Tensor | None  # [num_seqs] float32
    prompt_token_ids: Tensor | None  # [num_seqs, max_prompt_len] int64, padded with vocab_size
    output_token_ids: Tensor | None  # [num_seqs, max_output_len] int64, padded with vocab_size
    logit_bias: list[dict[int, float] | None] | None
    allowed_token_ids: list[tuple[int, ...] | None] | None  # per row; None: every token
    banned_token_ids: list[list[int]] | None  # per row, e.g. EOS while below min_tokens
    # structured outputs: [num_seqs, ceil(vocab_size / 32)] int32 allowed-token bits (bit j of
    # word w: token 32 * w + j); all ones in rows without a grammar
    grammar_bitmask: Tensor | None
    generators: dict[int, torch.Generator]  # row -> the request's seeded generator
    # the rows without a seed draw from this (the runner's); None: torch's global generator
    unseeded_generator: torch.Generator | None
    max_num_logprobs: int | None  # most top logprobs any row asks for
    all_greedy: bool
    all_random: bool

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        banned_token_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
        unseeded_generator: torch.Generator | None = None,
        grammar_bitmask: Tensor | None = None,
    ) -> SamplingMetadata:
        """Gather the rows' settings into tensors on `device`; unused features stay None so
        that `sample` skips them."""
        is_greedy = [p.is_greedy for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        repetition = _row_values([p.repetition_penalty for p in params], 1.0, device)
        presence = _row_values([p.presence_penalty for p in params], 0.0, device)
        frequency = _row_values([p.frequency_penalty for p in params], 0.0, device)
        any_penalty = any(t is not None for t in (repetition, presence, frequency))
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            # greedy rows (temperatures below GREEDY_TEMPERATURE too) are 0 here
            temperature=torch.tensor([0.0 if greedy else p.temperature
                                      for p, greedy in zip(params, is_greedy, strict=True)],
                                     dtype=torch.float32, device=device),
            top_k=_row_values(top_k, vocab_size, device, torch.int64),
            top_p=_row_values([p.top_p for p in params], 1.0, device),
            min_p=_row_values([p.min_p for p in params], 0.0, device),
            repetition_penalties=repetition,
            presence_penalties=presence,
            frequency_penalties=frequency,
            # the prompt only matters to the repetition penalty; OpenAI penalties see outputs
            prompt_token_ids=(_pad_rows(prompt_token_ids, vocab_size, device)
                              if repetition is not None else None),
            output_token_ids=(_pad_rows(output_token_ids, vocab_size, device)
                              if any_penalty else None),
            logit_bias=[p.logit_bias or None for p in params]
            if any(p.logit_bias for p in params) else None,
            allowed_token_ids=[p.allowed_token_ids for p in params]
            if any(p.allowed_token_ids is not None for p in params) else None,
            banned_token_ids=[list(b) for b in banned_token_ids]
            if any(banned_token_ids) else None,
            grammar_bitmask=(grammar_bitmask.to(device, non_blocking=True)
                             if grammar_bitmask is not None else None),
            # greedy rows draw nothing, so their generators are left out
            generators={row: g for row, g in enumerate(generators)
                        if g is not None and not is_greedy[row]},
            unseeded_generator=unseeded_generator,
            max_num_logprobs=max(logprobs) if logprobs else None,
            all_greedy=all(is_greedy),
            all_random=not any(is_greedy),
        )

    @classmethod
    def greedy(cls, num_seqs: int, device: torch.device) -> SamplingMetadata:
        """What `build` gives for rows whose params are all `is_plain_greedy`, without reading
        them: a decode step's sampling settings in a few microseconds instead of a pass over
        every row's params, outputs and bans."""
        return cls(temperature=torch.zeros(num_seqs, dtype=torch.float32, device=device),
                   top_k=None, top_p=None, min_p=None, repetition_penalties=None,
                   presence_penalties=None, frequency_penalties=None, prompt_token_ids=None,
                   output_token_ids=None, logit_bias=None, allowed_token_ids=None,
                   banned_token_ids=None, grammar_bitmask=None, generators={},
                   unseeded_generator=None, max_num_logprobs=None, all_greedy=True,
                   all_random=False)


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: Tensor  # [num_seqs] int64
    logprob_token_ids: Tensor | None  # [num_seqs, 1 + max_num_logprobs]: sampled, then top-k
    logprobs: Tensor | None  # [num_seqs, 1 + max_num_logprobs] float32
    sampled_token_ranks: Tensor | None  # [num_seqs] int64; 1 = most likely


def _row_values(values: Sequence[float], neutral: float, device: torch.device,
                dtype: torch.dtype = torch.float32) -> Tensor | None:
    """[num_seqs] tensor of per-row values, or None when every row has the neutral value."""
    if all(v == neutral for v in values):
        return None
    return torch.tensor(values, dtype=dtype, device=device)


def _pad_rows(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Tensor:
    """[num_rows, max_len] int64, padded with `pad_id` (vocab_size: one past the last token)."""
    max_len = max((len(r) for r in rows), default=0)
    padded = [list(r) + [pad_id] * (max_len - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.int64, device=device).view(len(rows), max_len)


def _row_col_index(rows: Sequence[Sequence[int] | None], device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """Flatten per-row token lists into (row, column) index tensors for one index_put."""
    row_ids = [row for row, cols in enumerate(rows) for _ in (cols or ())]
    col_ids = [col for cols in rows for col in (cols or ())]
    return (torch.tensor(row_ids, dtype=torch.int64, device=device),
            torch.tensor(col_ids, dtype=torch.int64, device=device))


def compute_logprobs(logits: Tensor) -> Tensor:
    """[num_seqs, vocab_size] log-probabilities of the raw logits (as vLLM reports them)."""
    return torch.log_softmax(logits, dim=-1)


def apply_allowed_token_ids(logits: Tensor,
                            allowed_token_ids: Sequence[Sequence[int] | None]) -> Tensor:
    """Set every token outside a row's allowed set to -inf; rows with None keep all."""
    num_seqs = logits.shape[0]
    restricted = [row for row in range(num_seqs) if allowed_token_ids[row] is not None]
    masked = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    masked[torch.tensor(restricted, dtype=torch.int64, device=logits.device)] = True
    masked.index_put_(_row_col_index(allowed_token_ids, logits.device),
                      torch.tensor(False, device=logits.device))
    return logits.masked_fill(masked, _NEG_INF)


def bad_words_banned_ids(bad_words_token_ids: Sequence[Sequence[int]],
                         output_token_ids: Sequence[int]) -> list[int]:
    """The tokens that would complete a bad word now: a word's last token when the output
    ends with all its other tokens (a one-token word: always). Only the output counts, not
    the prompt, so a word split between the two goes through (as in vLLM)."""
    banned = []
    num_output = len(output_token_ids)
    for word in bad_words_token_ids:
        num_prefix = len(word) - 1
        if num_prefix > num_output:
            continue
        if all(output_token_ids[num_output - num_prefix + i] == word[i]
               for i in range(num_prefix)):
            banned.append(word[-1])
    return banned


def apply_grammar_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """Set every token a row's grammar does not allow to -inf (a row of all ones keeps all).
    Each byte of the bitmask picks its 8 tokens' penalties (0 or -inf) from a 256-entry table:
    one gather and one add over the batch, several times faster on CPU than unpacking the
    bits into a boolean mask, or than picking out the constrained rows and putting them back."""
    vocab_size = logits.shape[1]
    index = bitmask.view(torch.uint8).view(-1).to(torch.int64)  # little-endian: token order
    table = _bit_penalties(logits.device, logits.dtype)
    penalties = table.index_select(0, index).view(bitmask.shape[0], -1)[:, :vocab_size]
    return logits + penalties


@functools.cache
def _bit_penalties(device: torch.device, dtype: torch.dtype) -> Tensor:
    """[256, 8]: entry [b, j] is 0 where bit j of byte b is set (allowed), else -inf."""
    is_set = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()
    return torch.zeros(256, 8, dtype=dtype).masked_fill_(~is_set, _NEG_INF).to(device)


def apply_banned_tokens(logits: Tensor, banned_token_ids: Sequence[Sequence[int]]) -> Tensor:
    """Set each row's banned tokens (EOS and stop ids under min_tokens) to -inf."""
    index = _row_col_index(banned_token_ids, logits.device)
    return logits.index_put(index, torch.tensor(_NEG_INF, device=logits.device))


def apply_logit_bias(logits: Tensor, logit_bias: Sequence[dict[int, float] | None]) -> Tensor:
    """Add each row's {token_id: bias} to its logits."""
    keys = [list(bias) if bias else None for bias in logit_bias]
    index = _row_col_index(keys, logits.device)
    values = [value for bias in logit_bias for value in (bias or {}).values()]
    bias_values = torch.tensor(values, dtype=logits.dtype, device=logits.device)
    return logits.index_put(index, bias_values, accumulate=True)


def token_mask(token_ids: Tensor, vocab_size: int) -> Tensor:
    """[num_seqs, vocab_size] bool: which tokens occur in each row of padded `token_ids`."""
    num_seqs = token_ids.shape[0]
    # one extra column swallows the vocab_size padding, then is dropped
    mask = torch.zeros(num_seqs, vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    return mask.scatter_(1, token_ids, True)[:, :vocab_size]


def token_counts(token_ids: Tensor, vocab_size: int) -> Tensor:
    """[num_seqs, vocab_size] float32: how often each token occurs in each row of `token_ids`."""
    num_seqs = token_ids.shape[0]
    counts = torch.zeros(num_seqs, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    ones = torch.ones_like(token_ids, dtype=torch.float32)
    return counts.scatter_add_(1, token_ids, ones)[:, :vocab_size]


def apply_repetition_penalty(logits: Tensor, penalties: Tensor, prompt_token_ids: Tensor,
                             output_token_ids: Tensor) -> Tensor:
    """Penalise every token seen in the prompt or output: divide positive logits by the
    penalty, multiply negative ones (the CTRL / transformers rule)."""
    vocab_size = logits.shape[1]
    seen = token_mask(prompt_token_ids, vocab_size) | token_mask(output_token_ids, vocab_size)
    penalties = penalties.unsqueeze(1)  # [num_seqs, 1]
    penalised = torch.where(logits > 0, logits / penalties, logits * penalties)
    return torch.where(seen, penalised, logits)


def apply_frequency_penalty(logits: Tensor, penalties: Tensor, output_counts: Tensor) -> Tensor:
    """OpenAI frequency penalty: subtract penalty * (times the token was generated)."""
    return logits - penalties.unsqueeze(1) * output_counts


def apply_presence_penalty(logits: Tensor, penalties: Tensor, output_counts: Tensor) -> Tensor:
    """OpenAI presence penalty: subtract the penalty once from every generated token."""
    return logits - penalties.unsqueeze(1) * (output_counts > 0).to(logits.dtype)


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """Divide each row by its temperature; greedy rows (0) are left as they are."""
    safe = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    return logits / safe.unsqueeze(1)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [num_seqs, 1]
    return logits.masked_fill(probs < threshold, _NEG_INF)


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """Keep each row's k largest logits (ties with the k-th are kept); k == vocab_size keeps
    all. A sort rather than topk(max k) so that no device sync is needed to read k."""
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth_index = (top_k.clamp(1, logits.shape[1]) - 1).unsqueeze(1)  # [num_seqs, 1]
    kth_value = sorted_logits.gather(1, kth_index)
    return logits.masked_fill(logits < kth_value, _NEG_INF)


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # ascending: the most likely is last
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # a token goes when everything at or below it sums to at most 1 - top_p
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    return logits.scatter(1, sorted_ids, sorted_logits)


def greedy_sample(logits: Tensor) -> Tensor:
    """[num_seqs] int64: each row's most likely token (the first one on ties, as argmax)."""
    if (logits.dtype == torch.float32 and logits.is_cpu and logits.is_contiguous()
            and (lib := native_library()) is not None):
        # one native call: at one stream the torch ops below run with cold caches (the
        # weights streamed through them just before), ~240 us where this takes ~60
        token_ids = torch.empty(logits.shape[0], dtype=torch.long)
        lib.argmax_rows_f32(logits.data_ptr(), logits.shape[0], logits.shape[1],
                            token_ids.data_ptr())
        return token_ids
    chunk = _argmax_chunk(logits.shape[1])
    if chunk is None or logits.device.type != "cpu" or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    return chunked_argmax(logits, chunk)


def chunked_argmax(logits: Tensor, chunk: int) -> Tensor:
    """argmax over the last dim in two levels: CPU argmax is scalar code (~2 ms over 16 rows
    of a 152k vocabulary) while amax is vectorised, so find each row's first chunk holding the
    maximum with amax, then argmax within that one chunk only. `chunk` divides vocab_size."""
    num_seqs, vocab_size = logits.shape
    blocks = logits.view(num_seqs, vocab_size // chunk, chunk)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)  # [num_seqs]; NaN wins, as in argmax
    rows = torch.arange(num_seqs, device=logits.device)
    return best_block * chunk + blocks[rows, best_block].argmax(dim=-1)


@functools.cache
def _argmax_chunk(vocab_size: int) -> int | None:
    """The divisor of vocab_size nearest its square root, if one of >= 64 leaves >= 8 chunks."""
    root = math.isqrt(vocab_size)
    sizes = [d for d in range(64, vocab_size // 8 + 1) if vocab_size % d == 0]
    return min(sizes, key=lambda d: abs(d - root)) if sizes else None


def random_sample(probs: Tensor, generators: dict[int, torch.Generator],
                  unseeded_generator: torch.Generator | None = None) -> Tensor:
    """[num_seqs] int64 drawn from `probs` by an exponential race: argmax(probs / q) with
    q ~ Exp(1) picks token i with probability probs[i]. A seeded row draws its whole q row
    from its own generator, so its tokens do not depend on its batch neighbours or index;
    the other rows share one draw from `unseeded_generator` (None: torch's global one)."""
    q = torch.empty_like(probs)  # [num_seqs, vocab_size]
    if len(generators) < probs.shape[0]:
        q.exponential_(generator=unseeded_generator)  # one batched draw for the unseeded rows
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    # an Exp(1) draw of exactly 0 would make probs / q inf or nan; the floor keeps argmax sane
    q = q.clamp_min(torch.finfo(q.dtype).tiny)
    return probs.div(q).argmax(dim=-1)


def gather_logprobs(logprobs: Tensor, token_ids: Tensor, num_logprobs: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The sampled token's logprob and rank, then the top `num_logprobs` tokens by logprob.
    Returns (ids [num_seqs, 1 + k], logprobs [num_seqs, 1 + k], ranks [num_seqs])."""
    sampled = token_ids.unsqueeze(1)  # [num_seqs, 1]
    sampled_logprobs = logprobs.gather(1, sampled)  # [num_seqs, 1]
    ranks = (logprobs > sampled_logprobs).sum(dim=-1) + 1
    top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)  # sorted, most likely first
    return (torch.cat([sampled, top_ids], dim=1),
            torch.cat([sampled_logprobs, top_logprobs], dim=1), ranks)


def process_logits(logits: Tensor, metadata: SamplingMetadata) -> Tensor:
    """Grammar, allowed tokens, bans, logit bias and penalties: what greedy and random rows
    both see. The grammar and the allowed set go first, so that bias and penalties only rank
    the tokens they keep, and always before temperature."""
    if metadata.grammar_bitmask is not None:
        logits = apply_grammar_bitmask(logits, metadata.grammar_bitmask)
    if metadata.allowed_token_ids is not None:
        logits = apply_allowed_token_ids(logits, metadata.allowed_token_ids)
    if metadata.banned_token_ids is not None:
        logits = apply_banned_tokens(logits, metadata.banned_token_ids)
    if metadata.logit_bias is not None:
        logits = apply_logit_bias(logits, metadata.logit_bias)
    if metadata.repetition_penalties is not None:
        assert metadata.prompt_token_ids is not None and metadata.output_token_ids is not None
        logits = apply_repetition_penalty(logits, metadata.repetition_penalties,
                                          metadata.prompt_token_ids, metadata.output_token_ids)
    if metadata.frequency_penalties is None and metadata.presence_penalties is None:
        return logits
    assert metadata.output_token_ids is not None
    counts = token_counts(metadata.output_token_ids, logits.shape[1])
    if metadata.frequency_penalties is not None:
        logits = apply_frequency_penalty(logits, metadata.frequency_penalties, counts)
    if metadata.presence_penalties is not None:
        logits = apply_presence_penalty(logits, metadata.presence_penalties, counts)
    return logits


def sample_random(logits: Tensor, metadata: SamplingMetadata) -> Tensor:
    """Temperature, min-p, top-k, top-p, then a draw from what is left."""
    logits = apply_temperature(logits, metadata.temperature)
    if metadata.min_p is not None:
        logits = apply_min_p(logits, metadata.min_p)
    if metadata.top_k is not None:
        logits = apply_top_k(logits, metadata.top_k)
    if metadata.top_p is not None:
        logits = apply_top_p(logits, metadata.top_p)
    return random_sample(torch.softmax(logits, dim=-1), metadata.generators,
                         metadata.unseeded_generator)


def sample(logits: Tensor, metadata: SamplingMetadata) -> SamplerOutput:
    """Choose each row's next token from `logits` [num_seqs, vocab_size]; logprobs, when any
    row asks, describe the raw distribution, before any processing."""
    logits = logits.float()
    raw_logprobs = compute_logprobs(logits) if metadata.max_num_logprobs is not None else None
    logits = process_logits(logits, metadata)
    if metadata.all_greedy:
        token_ids = greedy_sample(logits)
    elif metadata.all_random:
        token_ids = sample_random(logits, metadata)
    else:
        is_greedy = metadata.temperature == 0
        token_ids = torch.where(is_greedy, greedy_sample(logits), sample_random(logits, metadata))
    if raw_logprobs is None or metadata.max_num_logprobs is None:
        return SamplerOutput(token_ids, None, None, None)
    ids, logprobs, ranks = gather_logprobs(raw_logprobs, token_ids, metadata.max_num_logprobs)
    return SamplerOutput(token_ids, ids, logprobs, ranks)
