"""The rejection sampler: verifies k proposed tokens against the target model's distributions
from one pass, so that what comes out is distributed exactly as target sampling would be.

Proposal i (drawn from the draft's q_i) is accepted with probability min(1, p_i(x) / q_i(x));
at the first rejection a token is drawn from norm(max(0, p_i - q_i)) instead and the rest is
dropped; when all k are accepted, one more (the bonus) is drawn from p_k. An n-gram proposal
is a draft with q one-hot at its token: accepted with probability p_i(x), and the residual is
p_i without x. Greedy rows accept while the proposal is the target's argmax, then take the
argmax: exactly the tokens of greedy decoding without speculation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def acceptance_probs(target_probs: Tensor, draft_probs: Tensor | None,
                     draft_token_ids: Tensor) -> Tensor:
    """[k] probability of accepting each proposal: min(1, p_i(x_i) / q_i(x_i)).
    target_probs [k, vocab_size], draft_probs [k, vocab_size] or None (one-hot: n-gram)."""
    rows = torch.arange(draft_token_ids.shape[0], device=draft_token_ids.device)
    p = target_probs[rows, draft_token_ids]
    if draft_probs is None:
        return p
    q = draft_probs[rows, draft_token_ids]
    return torch.where(q > 0, (p / q.clamp_min(torch.finfo(q.dtype).tiny)).clamp(max=1.0), 1.0)


def residual_probs(target_probs: Tensor, draft_probs: Tensor | None,
                   draft_token_ids: Tensor) -> Tensor:
    """[k, vocab_size] the distribution to draw from after rejecting proposal i:
    norm(max(0, p_i - q_i)). Where p_i <= q_i everywhere (rejection then has probability 0)
    p_i itself, so the row is always a distribution."""
    if draft_probs is None:
        draft_probs = torch.zeros_like(target_probs).scatter_(
            1, draft_token_ids.unsqueeze(1), 1.0)
    residual = (target_probs - draft_probs).clamp_min(0.0)
    total = residual.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp_min(torch.finfo(total.dtype).tiny),
                       target_probs)


def verify_row(target_probs: Tensor, draft_probs: Tensor | None, draft_token_ids: Tensor,
               generator: torch.Generator | None = None) -> list[int]:
    """One row's output tokens: the accepted proposals, then a resampled or bonus token
    (1 to k + 1 tokens). target_probs [k + 1, vocab_size] (the last row: after all k),
    draft_probs [k, vocab_size] or None, draft_token_ids [k]."""
    num_draft = draft_token_ids.shape[0]
    accept = acceptance_probs(target_probs[:num_draft], draft_probs, draft_token_ids)
    uniforms = torch.rand(num_draft, generator=generator, device=target_probs.device)
    accepted = (uniforms < accept).tolist()
    num_accepted = accepted.index(False) if False in accepted else num_draft
    output = draft_token_ids[:num_accepted].tolist()
    if num_accepted < num_draft:
        residual = residual_probs(target_probs[num_accepted:num_accepted + 1],
                                  None if draft_probs is None
                                  else draft_probs[num_accepted:num_accepted + 1],
                                  draft_token_ids[num_accepted:num_accepted + 1])
        last = torch.multinomial(residual[0], 1, generator=generator)
    else:
        last = torch.multinomial(target_probs[num_draft], 1, generator=generator)
    return output + [int(last)]


def verify_greedy_row(target_logits: Tensor, draft_token_ids: Tensor) -> list[int]:
    """Greedy: accept proposals while each is the target's argmax, then the argmax itself.
    target_logits [k + 1, vocab_size], draft_token_ids [k]."""
    best = target_logits.argmax(dim=-1).tolist()  # [k + 1]
    output = []
    for proposal, target in zip(draft_token_ids.tolist(), best, strict=False):
        if proposal != target:
            break
        output.append(proposal)
    return output + [best[len(output)]]
