"""Chat rendering: the exact request/response split for three template styles, and the truncation rules."""
from collections import Counter

import pytest

from repbend.data import DataError, Limits, render_conversation, render_request_response
from repbend.data.chat import render_requests_responses
from repbend.demo.assets import TEMPLATES, build_tokenizer

# what each template's request (user turn + generation prompt) ends with
GEN_PROMPT_END = {
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "[/INST]",
    "chatml": "<|im_start|>assistant\n",
}
PROMPT = "How do I bake bread? Request number 3."
RESPONSE = "Mix flour, water, salt and yeast, then bake it."


_TOKENIZERS = {}


@pytest.fixture(params=TEMPLATES)
def template(request):
    return request.param


@pytest.fixture
def tok(template):
    if template not in _TOKENIZERS:
        _TOKENIZERS[template] = build_tokenizer(template=template)
    return _TOKENIZERS[template]


def _decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _texts(tok, prompt, response):
    user = [{"role": "user", "content": prompt}]
    request = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    return request, full


# the template's end-of-turn markup after an assistant turn
END_OF_TURN = {"llama3": "<|eot_id|>", "mistral": "</s>", "chatml": "<|im_end|>"}


def test_split_is_exact(tok, template):
    request, full = _texts(tok, PROMPT, RESPONSE)
    seq = render_request_response(tok, PROMPT, RESPONSE, Limits(), "t:1")
    assert seq.origin == "t:1"
    assert _decode(tok, seq.input_ids[:seq.request_len]) == request
    # the last request token closes the generation prompt; the response starts right after it
    assert request.endswith(_decode(tok, seq.input_ids[seq.request_len - 1:seq.request_len]))
    assert _decode(tok, seq.input_ids[:seq.request_len]).endswith(GEN_PROMPT_END[template])
    # the request ids are those of the request text alone (separate tokenization)
    assert list(seq.input_ids[:seq.request_len]) == tok(request, add_special_tokens=False)["input_ids"]


def test_response_is_the_bare_response_text(tok, template):
    """The response part is tokenizer(response, add_special_tokens=False) and nothing else: no end-of-turn or
    eos markup (the published data layer), so a response_all row has exactly the response's own tokens."""
    request, _ = _texts(tok, PROMPT, RESPONSE)
    eot = tok.convert_tokens_to_ids(END_OF_TURN[template])
    seq = render_request_response(tok, PROMPT, RESPONSE, Limits(), "t:1")
    bare = tok(RESPONSE, add_special_tokens=False)["input_ids"]
    assert list(seq.input_ids) == tok(request, add_special_tokens=False)["input_ids"] + bare
    assert list(seq.input_ids[seq.request_len:]) == bare and seq.response_len == len(bare)
    assert _decode(tok, seq.input_ids[seq.request_len:]) == RESPONSE
    assert eot not in seq.input_ids[seq.request_len:] and tok.eos_token_id not in seq.input_ids[seq.request_len:]
    # batched: each row is its own bare response, and request-only rows in between take no response ids
    other = "Knead it for ten minutes."
    seqs = render_requests_responses(tok, [PROMPT, PROMPT, "Hi"], [RESPONSE, None, other], Limits(), ["a", "b", "c"])
    assert [s.input_ids[s.request_len:] for s in seqs] == [
        tuple(bare), (), tuple(tok(other, add_special_tokens=False)["input_ids"])]


def test_response_markup_keeps_the_template_tail(tok, template):
    request, full = _texts(tok, PROMPT, RESPONSE)
    eot = tok.convert_tokens_to_ids(END_OF_TURN[template])
    seq = render_request_response(tok, PROMPT, RESPONSE, Limits(), "t:1", response_markup=True)
    plain = render_request_response(tok, PROMPT, RESPONSE, Limits(), "t:1")
    assert seq.input_ids[:seq.request_len] == plain.input_ids[:plain.request_len]
    assert _decode(tok, seq.input_ids[seq.request_len:]) == full[len(request):]
    tail = full[len(request):]
    assert tail.rstrip("\n").endswith(END_OF_TURN[template])  # chatml writes a newline after <|im_end|>
    resp = list(seq.input_ids[seq.request_len:])
    assert eot in resp and resp[-1] in (eot, *tok("\n", add_special_tokens=False)["input_ids"])


def test_request_only(tok):
    request, _ = _texts(tok, PROMPT, RESPONSE)
    seq = render_request_response(tok, PROMPT, None, Limits(), "t:2")
    assert seq.request_len == len(seq.input_ids) and seq.response_len == 0
    assert _decode(tok, seq.input_ids) == request
    with_response = render_request_response(tok, PROMPT, RESPONSE, Limits(), "t:2")
    assert seq.input_ids == with_response.input_ids[:with_response.request_len]


def test_conversation_is_all_retain(tok):
    messages = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "How can I help you?"},
                {"role": "user", "content": "Add 12 and 30."}, {"role": "assistant", "content": "42."}]
    seq = render_conversation(tok, messages, Limits(), "u:1")
    assert seq.request_len == 0
    assert _decode(tok, seq.input_ids) == tok.apply_chat_template(messages, tokenize=False)


def test_truncation_keeps_request_end_and_bos_response_start(tok):
    long_prompt = "the quick brown fox " * 60 + "request number 7"
    long_response = "sure, here is a short answer " * 60
    full = render_request_response(tok, long_prompt, long_response, Limits(10_000, 10_000, 10_000), "t:3")
    req, resp = full.input_ids[:full.request_len], full.input_ids[full.request_len:]
    counts = Counter()
    limits = Limits(max_request_tokens=24, max_response_tokens=16)
    seq = render_request_response(tok, long_prompt, long_response, limits, "t:3", counts=counts)
    assert counts == Counter(request=1, response=1)
    assert seq.request_len == 24 and len(seq.input_ids) == 24 + 16
    cut_req, cut_resp = seq.input_ids[:24], seq.input_ids[24:]
    if req[0] == tok.bos_token_id:  # llama3 and mistral put BOS first: it stays, then the request's end
        assert cut_req == req[:1] + req[-23:]
    else:  # chatml: no BOS in the template
        assert cut_req == req[-24:]
    assert cut_resp == resp[:16]
    # within the limits nothing is cut or counted
    counts = Counter()
    render_request_response(tok, PROMPT, RESPONSE, Limits(), "t:4", counts=counts)
    assert counts["request"] == 0 and counts["response"] == 0


def test_retain_truncation_keeps_beginning(tok):
    messages = [{"role": "user", "content": "Hello! " * 50}, {"role": "assistant", "content": "Thank you. " * 50}]
    full = render_conversation(tok, messages, Limits(), "u:2")
    counts = Counter()
    seq = render_conversation(tok, messages, Limits(max_retain_tokens=30), "u:2", counts=counts)
    assert seq.input_ids == full.input_ids[:30] and counts == Counter(retain=1)


def test_template_without_request_prefix_is_an_error():
    tok = build_tokenizer(template="chatml")
    # the generation prompt says "assistant" but the assistant turn is rendered as "bot": no exact split exists
    tok.chat_template = tok.chat_template.replace("message['role']", "('bot' if message['role'] == 'assistant' "
                                                                      "else message['role'])")
    with pytest.raises(DataError, match=r"t:9: .*does not render the request .* as a prefix"):
        render_request_response(tok, PROMPT, RESPONSE, Limits(), "t:9", response_markup=True)
    render_request_response(tok, PROMPT, None, Limits(), "t:9")  # the request alone still renders
    render_request_response(tok, PROMPT, RESPONSE, Limits(), "t:9")  # the bare response needs no split


def test_template_error_names_the_row():
    tok = build_tokenizer(template="mistral")
    with pytest.raises(DataError, match=r"u:5: the chat template rejected the row: roles must be"):
        render_conversation(tok, [{"role": "tool", "content": "x"}], Limits(), "u:5")


def test_limits_validation():
    with pytest.raises(ValueError, match="max_request_tokens"):
        Limits(max_request_tokens=0)
