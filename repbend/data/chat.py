"""Render rows into token ids with the tokenizer's own chat template, splitting request from response.

No per-family tags live here: the request comes from the template itself, the response is its bare text.
    request_text = apply_chat_template([user], add_generation_prompt=True)   (ends with the generation prompt)
    ids = tok(request_text) + tok(response)          (both with add_special_tokens=False)
The template writes its own BOS (and any other markup) into request_text, so the request ids hold exactly the
special tokens the template put there. The response part is the response text's own tokens and nothing after it:
no end-of-turn or end-of-sequence markup, as in the published RepBend data layer (the template's tail after the
assistant turn belongs to neither the request nor the response, so the response_* masks, L_pair and the
request_response mode never see it). Tokens [0, request_len) decode to request_text, the rest to the response.

`response_markup=True` renders the whole assistant turn through the template instead (for methods that train on
it, e.g. Circuit Breakers or RMU):
    full_text = apply_chat_template([user, assistant])
    full_text must start with request_text (else DataError: the template cannot be split);
    ids = tok(request_text) + tok(full_text[len(request_text):])
so the response part is the response as the template writes it (it may trim it) plus the template's end-of-turn
markup (`<|eot_id|>`; `</s>`; `<|im_end|>` and a newline; ...).

The two parts are always tokenized separately, so request_len is exact.

`whole_limit` (Circuit Breakers' and RMU's retain side, as their reference tokenizes those rows): the row is cut as
one sequence to its first `whole_limit` tokens instead of cutting request and response apart (counted as
"retain").

Truncation (counted in `counts` by part, and so reported by `build_pools`):
    request  keeps its END (the end of the user turn and the generation prompt: the last request token, where
             L_cos and the request_last mask read, is never cut away), plus its leading BOS token when the
             template put one there; so a cut request is [BOS] + last (max_request_tokens - 1) tokens.
    response keeps its beginning (the first tokens, which the response_* masks and L_pair use); with
             `response_markup=True` a cut response loses its end-of-turn markup.
    retain   keeps its beginning.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence as Seq

from repbend.data.errors import DataError
from repbend.data.examples import Sequence


@dataclass(frozen=True)
class Limits:
    """Token budgets per part (the reference recipe's lengths; it pads to them, we only cut)."""

    max_request_tokens: int = 512
    """request incl. the generation prompt; a longer one keeps its BOS and its last tokens"""
    max_response_tokens: int = 512
    """the response's own tokens (with `response_markup`: plus the end-of-turn markup); a longer one keeps its
    first tokens"""
    max_retain_tokens: int = 1024
    """a whole retain conversation; a longer one keeps its first tokens"""

    def __post_init__(self):
        for name in ("max_request_tokens", "max_response_tokens", "max_retain_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict:
        return {"max_request_tokens": self.max_request_tokens, "max_response_tokens": self.max_response_tokens,
                "max_retain_tokens": self.max_retain_tokens}


def _check_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; RepBend renders every row with the model's own "
                         "template (set tokenizer.chat_template)")


def _apply(tokenizer, messages: list[dict], origin: str, **kwargs) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:
        raise DataError(origin, f"the chat template rejected the row: {e}", reason="chat template error") from None


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _cut_request(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    if len(ids) <= limit:
        return ids
    if bos_id is not None and ids[0] == bos_id and limit >= 2:
        return [ids[0]] + ids[len(ids) - (limit - 1):]
    return ids[len(ids) - limit:]


def _markup_tails(tokenizer, users: list[list[dict]], requests: list[str], responses: Seq[str | None],
                  origins: Seq[str]) -> list[str]:
    """The template's text after the request for each row with a response: the assistant turn with its markup."""
    tails = []
    for user, request, response, origin in zip(users, requests, responses, origins):
        if response is None:
            continue
        full = _apply(tokenizer, user + [{"role": "assistant", "content": response}], origin)
        if not full.startswith(request):
            raise DataError(
                origin, "the chat template does not render the request (user turn + generation prompt) as a "
                "prefix of the request+response text, so the response tokens cannot be told apart; "
                f"request ends {request[-40:]!r}, full text has {full[len(request) - 40:len(request)]!r} there",
                reason="chat template: request is not a prefix")
        tails.append(full[len(request):])
    return tails


def render_requests_responses(tokenizer, prompts: Seq[str], responses: Seq[str | None], limits: Limits | None,
                              origins: Seq[str], *, counts: Counter | None = None,
                              response_markup: bool = False, whole_limit: int | None = None) -> list[Sequence]:
    """Batched `render_request_response` (one tokenizer call per part for the whole list)."""
    _check_template(tokenizer)
    limits = limits or Limits()
    counts = Counter() if counts is None else counts
    if not len(prompts) == len(responses) == len(origins):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(origins)} origins")
    users = [[{"role": "user", "content": prompt}] for prompt in prompts]
    request_texts = [_apply(tokenizer, user, origin, add_generation_prompt=True)
                     for user, origin in zip(users, origins)]
    if response_markup:
        response_texts = _markup_tails(tokenizer, users, request_texts, responses, origins)
    else:
        response_texts = [r for r in responses if r is not None]

    request_ids = _tokenize(tokenizer, request_texts)
    response_ids = iter(_tokenize(tokenizer, response_texts))
    bos_id = tokenizer.bos_token_id
    out = []
    for req, response, origin in zip(request_ids, responses, origins):
        resp: list[int] = [] if response is None else next(response_ids)
        if response is not None and not resp:
            raise DataError(origin, "the response renders to no tokens", field="response", reason="empty response")
        if whole_limit is not None:
            if len(req) + len(resp) > whole_limit:
                counts["retain"] += 1
            ids = (req + resp)[:whole_limit]
            out.append(Sequence(tuple(ids), min(len(req), whole_limit), origin))
            continue
        cut = _cut_request(req, limits.max_request_tokens, bos_id)
        if len(cut) < len(req):
            counts["request"] += 1
        if len(resp) > limits.max_response_tokens:
            counts["response"] += 1
        resp = resp[:limits.max_response_tokens]
        out.append(Sequence(tuple(cut + resp), len(cut), origin))
    return out


def render_request_response(tokenizer, prompt: str, response: str | None, limits: Limits | None, origin: str,
                            *, counts: Counter | None = None, response_markup: bool = False) -> Sequence:
    """One request (+ response) -> Sequence with the exact request/response split (module docstring): the
    response part is `tokenizer(response, add_special_tokens=False)`, or with `response_markup=True` the
    template's assistant turn including its end-of-turn markup. `response=None` renders the request with its
    generation prompt only (request-only loss modes)."""
    return render_requests_responses(tokenizer, [prompt], [response], limits, [origin], counts=counts,
                                     response_markup=response_markup)[0]


def render_conversations(tokenizer, conversations: Seq[list[dict]], limits: Limits | None, origins: Seq[str],
                         *, counts: Counter | None = None) -> list[Sequence]:
    """Batched `render_conversation`."""
    _check_template(tokenizer)
    limits = limits or Limits()
    counts = Counter() if counts is None else counts
    texts = [_apply(tokenizer, list(messages), origin) for messages, origin in zip(conversations, origins, strict=True)]
    out = []
    for ids, origin in zip(_tokenize(tokenizer, texts), origins):
        if len(ids) > limits.max_retain_tokens:
            counts["retain"] += 1
        out.append(Sequence(tuple(ids[:limits.max_retain_tokens]), 0, origin))
    return out


def render_conversation(tokenizer, messages: list[dict], limits: Limits | None, origin: str,
                        *, counts: Counter | None = None) -> Sequence:
    """A whole chat (no generation prompt) -> Sequence with request_len = 0 (all tokens are retain tokens),
    cut at its end to `limits.max_retain_tokens`."""
    return render_conversations(tokenizer, [messages], limits, [origin], counts=counts)[0]
