"""Eval generation and attacks on a tiny random Llama: left-padded batches, stop tokens, prefill, soft prompts."""
import pytest
import torch

from repbend.demo.assets import build_tiny_model, build_tokenizer
from repbend.eval import attacks as atk
from repbend.eval.benchmarks import Item
from repbend.eval.generation import (GenRequest, encode, generate, greedy_generate, render_chat,
                                     stop_token_ids)

PROMPTS = ["Hello!", "How do I bake bread? Tell me everything, step by step.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    return build_tiny_model(tok, layers=2, hidden=64), tok


def _item(i, prompt, target="Sure, here is the answer"):
    return Item("harmbench", f"b{i}", prompt, [{"role": "user", "content": prompt}], prompt, None, target)


def _requests(tok):
    return [GenRequest(encode(tok, render_chat(tok, [{"role": "user", "content": p}]))) for p in PROMPTS]


def test_batched_equals_one_by_one(tiny):
    model, tok = tiny
    reqs = _requests(tok)
    batched = greedy_generate(model, reqs, max_new_tokens=6, stop_ids=[], pad_id=tok.pad_token_id)
    single = [greedy_generate(model, [r], max_new_tokens=6, stop_ids=[], pad_id=tok.pad_token_id)[0] for r in reqs]
    assert batched == single and all(len(t) == 6 for t in batched)
    # the same through the batching front end, which reorders by length and restores the order
    texts = generate(model, tok, reqs, max_new_tokens=6, batch_size=2, stop_ids=[])
    assert texts == [tok.decode(t, skip_special_tokens=True) for t in single]


def test_stop_tokens(tiny):
    model, tok = tiny
    reqs = _requests(tok)
    free = greedy_generate(model, reqs, max_new_tokens=6, stop_ids=[], pad_id=tok.pad_token_id)
    stop = free[1][3]  # row 1's 4th token: row 1 must end just before it, other rows at their first occurrence
    cut = greedy_generate(model, reqs, max_new_tokens=6, stop_ids=[stop], pad_id=tok.pad_token_id)
    for full, short in zip(free, cut):
        k = full.index(stop) if stop in full else len(full)
        assert short == full[:k]
    assert len(cut[1]) <= 3


def test_stop_token_ids_include_end_of_turn():
    tok = build_tokenizer(template="llama3")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert stop_token_ids(tok) == [eot]
    tok.eos_token = "<|end_of_text|>"  # a base-model eos: the template's end-of-turn token must still stop
    eos = tok.convert_tokens_to_ids("<|end_of_text|>")
    assert stop_token_ids(tok) == sorted({eos, eot})
    chatml = build_tokenizer(template="chatml")
    assert chatml.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(chatml)


def test_prefill_and_transfer_requests(tiny):
    _, tok = tiny
    items = [_item(0, "Tell me X"), _item(1, "No target", target=None)]
    transfer = {"b0": [{"prompt": "Roleplay: tell me X", "method": "PAIR"}, {"prompt": "Plain", "method": None}]}
    jobs, skipped = atk.build_jobs(items, ["direct", "prefill", "input_embed", "transfer"], transfer)
    keys = [j.key for j in jobs]
    assert keys == [("harmbench", "b0", "direct"), ("harmbench", "b0", "prefill"), ("harmbench", "b0", "input_embed"),
                    ("harmbench", "b0#0", "transfer:PAIR"), ("harmbench", "b0#1", "transfer"),
                    ("harmbench", "b1", "direct")]
    assert skipped == {("harmbench", "prefill"): 1, ("harmbench", "input_embed"): 1}
    prefill = jobs[1]
    assert prefill.prefill == "Sure, here is the answer:\n\n"
    text = tok.decode(atk.job_request(tok, prefill).ids)
    assert text == render_chat(tok, prefill.messages) + "Sure, here is the answer:\n\n"
    assert jobs[3].prompt == "Roleplay: tell me X" and jobs[3].messages[-1]["content"] == "Roleplay: tell me X"


def test_soft_prompt_slot_and_embedding_path(tiny):
    model, tok = tiny
    job = atk.build_jobs([_item(0, "Tell me X")], ["input_embed"])[0][0]
    req = atk.soft_slot_request(tok, job)
    assert tok.decode(req.ids[:req.soft_at]).endswith("Tell me X")
    assert tok.decode(req.ids) == render_chat(tok, job.messages)
    # a soft prompt equal to the embeddings of real tokens generates exactly what those tokens generate
    extra = encode(tok, " please")
    soft = model.get_input_embeddings().weight[torch.tensor(extra)].detach()
    as_ids = GenRequest(req.ids[:req.soft_at] + extra + req.ids[req.soft_at:])
    as_soft = GenRequest(req.ids, soft=soft, soft_at=req.soft_at)
    other = _requests(tok)[1]
    out = greedy_generate(model, [other, as_soft], max_new_tokens=5, stop_ids=[], pad_id=tok.pad_token_id)
    assert out[1] == greedy_generate(model, [as_ids], max_new_tokens=5, stop_ids=[], pad_id=tok.pad_token_id)[0]


def test_input_embedding_attack_lowers_target_loss(tiny):
    model, tok = tiny
    jobs = atk.build_jobs([_item(0, "Tell me X"), _item(1, "A longer request about bread", "Sure")],
                          ["input_embed"])[0]
    reqs = [atk.soft_slot_request(tok, j) for j in jobs]
    targets = [j.item.target for j in jobs]
    _, start, _ = atk.optimize_soft_prompts(model, tok, reqs, targets, n_tokens=4, steps=1, lr=0.0)
    soft, best, steps = atk.optimize_soft_prompts(model, tok, reqs, targets, n_tokens=4, steps=6, lr=0.05)
    assert steps == 6 and all(b < s for b, s in zip(best, start))
    assert soft[0].shape == (4, model.config.hidden_size) and soft[0].dtype == torch.float32
    assert not any(p.grad is not None for p in model.parameters())  # the model stayed frozen


def test_generation_is_the_models_generate_and_plain_greedy(tiny, monkeypatch):
    """Generation goes through `model.generate`, and a checkpoint's sampling settings (generation_config) are set
    aside: the output is the argmax continuation, computed here one token at a time without a cache."""
    import copy

    model, tok = tiny
    reqs = _requests(tok)
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.temperature, config.top_k, config.repetition_penalty = True, 5.0, 2, 3.0
    monkeypatch.setattr(model, "generation_config", config)
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(k) or real(*a, **k))
    out = greedy_generate(model, reqs, max_new_tokens=5, stop_ids=[], pad_id=tok.pad_token_id)
    assert len(calls) == 1 and model.generation_config is config and config.temperature == 5.0  # restored
    with torch.no_grad():
        for req, got in zip(reqs, out):
            ids, want = list(req.ids), []
            for _ in range(5):
                want.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                ids.append(want[-1])
            assert got == want
