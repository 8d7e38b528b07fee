"""The data layer where it reproduces the reference's (docs/method.md, "The data layer against the reference's"),
each built from rows that show the difference, and the one label rule for every label field. Harmful content stays
abstract ("harmful request #3")."""
import json

import pytest

from repbend import RepBendConfig
from repbend.build import build_data, check_data
from repbend.data import Limits, build_pools
from repbend.data.wildjailbreak import parse_pair
from repbend.demo.assets import build_tokenizer
from repbend.errors import TrainingError
from repbend.loss import LossConfig, RepBendLoss


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(template="llama3")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _chat(i, turns=2):
    return {"messages": [{"role": "user" if k % 2 == 0 else "assistant", "content": f"turn {k} of chat #{i}"}
                         for k in range(turns)]}


def _wgm(i, harmful, prompt=None, response=None):
    return {"prompt": prompt or f"{'harmful' if harmful else 'benign'} request #{i}",
            "response": response or f"answer #{i}", "prompt_harm_label": "harmful" if harmful else "unharmful",
            "response_refusal_label": "compliance", "response_harm_label": "harmful" if harmful else "unharmful"}


def test_d3_one_message_chats_are_left_out_for_repbend_too(tok, tmp_path):
    uc = _jsonl(tmp_path / "uc.jsonl", [_chat(0), {"messages": [{"role": "user", "content": "alone"}]}, _chat(2)])
    pools = build_pools(tok, ultrachat=uc)
    rep = pools.report.sources["ultrachat"]
    assert len(pools.retain) == 2 and rep.left == {"fewer than 2 messages": 1}
    assert [s.origin for s in pools.retain] == [f"{uc}:1", f"{uc}:3"]


def test_d5_circuit_breakers_cuts_retain_side_rows_whole(tok, tmp_path):
    long_prompt = " ".join(f"word{i}" for i in range(300))
    wgm = _jsonl(tmp_path / "wgm.jsonl", [_wgm(0, False, prompt=long_prompt, response="short answer"),
                                         _wgm(1, True, prompt=long_prompt, response="long " * 200)])
    limits = Limits(max_request_tokens=64, max_response_tokens=64, max_retain_tokens=128)
    cb = build_pools(tok, wgm, spec=RepBendLoss(LossConfig(method="circuit_breakers")).data_spec(0.0), limits=limits)
    safe, unsafe = cb.safe[0], cb.unsafe[0]
    # the retain side (a safe row): one sequence cut at max_retain_tokens keeping its start, the request kept whole
    assert len(safe) == 128 and safe.request_len == 128
    full = build_pools(tok, wgm, spec=RepBendLoss(LossConfig(method="circuit_breakers")).data_spec(0.0),
                       limits=Limits(10_000, 10_000, 10_000)).safe[0]
    assert safe.input_ids == full.input_ids[:128]
    # the forget side keeps the per-part cuts (request: BOS + its end; response: its start)
    assert unsafe.request_len == 64 and unsafe.response_len == 64
    # RepBend cuts request and response apart, as before
    rb = build_pools(tok, wgm, limits=limits).safe[0]
    assert rb.request_len == 64 and rb.input_ids[0] == tok.bos_token_id


def test_d6_the_first_chats_in_file_order_by_default(tok, tmp_path):
    uc = _jsonl(tmp_path / "uc.jsonl", [_chat(i) for i in range(12)])
    first = build_pools(tok, ultrachat=uc, max_examples_per_pool=5)
    assert [s.origin for s in first.retain] == [f"{uc}:{i}" for i in range(1, 6)]
    rand = build_pools(tok, ultrachat=uc, max_examples_per_pool=5, subset="random", seed=1)
    assert len(rand.retain) == 5 and [s.origin for s in rand.retain] != [s.origin for s in first.retain]
    assert RepBendConfig.load(None, []).data.subset == "first"


def test_d7_one_label_rule_for_every_label_field_counted_in_the_report(tok, tmp_path):
    wgm_rows = [_wgm(0, True), {**_wgm(1, True), "prompt_harm_label": "Harmful "}, _wgm(2, False)]
    wj_rows = [{"prompt": f"jailbreak #{i}", "prompt_type": t, "harmless_answer": "refusal", "harmful_answer": "x"}
               for i, t in enumerate(["harmful", "Harmful", " HARMFUL", "benign"])]
    pools = build_pools(tok, _jsonl(tmp_path / "w.jsonl", wgm_rows), _jsonl(tmp_path / "j.jsonl", wj_rows))
    assert len(pools.unsafe) == 2 and len(pools.pair) == 3
    reports = pools.report.sources
    assert reports["wildguardmix"].normalised == {"prompt_harm_label": 1}
    assert reports["wildjailbreak"].normalised == {"prompt_type": 2}
    assert reports["wildjailbreak"].left == {"prompt_type 'benign'": 1}
    assert "2 prompt_type value(s) matched once trimmed / case-folded" in pools.report.summary()
    assert parse_pair("f:1", {"prompt": "p", "prompt_type": "Harmful", "harmless_answer": "a",
                              "harmful_answer": "b"})[0] == "pair"


def _cfg(paths, *extra):
    args = []
    for key, path in paths.items():
        args += [f"--data.{key}", path]
    return RepBendConfig.load(None, args + list(extra))


def test_a_named_file_without_usable_rows_is_an_error_naming_the_values_seen(tok, tmp_path):
    wj = _jsonl(tmp_path / "j.jsonl", [{"prompt": f"p{i}", "prompt_type": "adversarial_harmful",
                                        "harmless_answer": "a", "harmful_answer": "b"} for i in range(3)])
    empty = tmp_path / "w.jsonl"
    empty.write_text("")
    for paths, pattern in (({"wildguardmix": str(empty), "wildjailbreak": wj}, r"data.wildguardmix .*w.jsonl gave no "
                            r"usable safe/unsafe rows \(0 read\)"),
                           ({"wildjailbreak": wj}, r"data.wildjailbreak .*gave no usable pair rows \(3 read, 3 left "
                            r"out by the label rules: 3 x prompt_type 'adversarial_harmful'\)")):
        cfg = _cfg(paths)
        loss = RepBendLoss(cfg.loss)
        pools = build_data(cfg, tok, loss)
        with pytest.raises(TrainingError, match=pattern):
            check_data(cfg, pools, loss)



def test_a_file_the_method_does_not_read_is_an_error(tok, tmp_path):
    wgm = _jsonl(tmp_path / "w.jsonl", [_wgm(0, True), _wgm(1, False)])
    cfg = _cfg({"wildguardmix": wgm}, "--loss.method", "dpo")
    with pytest.raises(TrainingError, match="data.wildguardmix .*loss.method dpo reads pair rows.*leave it out"):
        build_data(cfg, tok, RepBendLoss(cfg.loss))
