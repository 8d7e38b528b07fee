"""Readers and build_pools: label rules, filters, validation errors, skip counts, file formats, the cap.
Harmful content stays abstract ("harmful request #3")."""
import json

import pytest

from repbend.data import DataError, Limits, build_pools
from repbend.loss import LossConfig, RepBendLoss
from repbend.data.examples import SourceReport
from repbend.data.sources import read_records
from repbend.data.ultrachat import parse_chat
from repbend.data.wildguardmix import classify
from repbend.data.wildjailbreak import parse_pair
from repbend.demo.assets import build_tokenizer

RO = RepBendLoss(LossConfig(mode="request_all")).data_spec()  # how the request-only modes render


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(template="llama3")


def wgm(i, ph, rr, rh, response="answer #{i}", prompt="request #{i}"):
    return {"prompt": prompt.format(i=i), "response": None if response is None else response.format(i=i),
            "prompt_harm_label": ph, "response_refusal_label": rr, "response_harm_label": rh}


# (row, response-mode outcome, request-only outcome); outcome = "safe" | "unsafe" | ("left", reason)
H, U, REF, COMP = "harmful", "unharmful", "refusal", "compliance"
LABEL_TABLE = [
    (wgm(0, U, COMP, U), "safe", "safe"),
    (wgm(1, H, REF, U), "safe", "unsafe"),
    (wgm(2, H, COMP, H), "unsafe", "unsafe"),
    (wgm(3, H, COMP, U), "unsafe", "unsafe"),  # unsafe = prompt harmful AND compliance, whatever the response label
    (wgm(4, U, REF, U), ("left", "prompt unharmful, refusal, response unharmful"), "safe"),
    (wgm(5, U, COMP, H), ("left", "prompt unharmful, compliance, response harmful"), "safe"),
    (wgm(6, H, REF, H), ("left", "prompt harmful, refusal, response harmful"), "unsafe"),
    (wgm(7, H, None, None, response=None), ("left", "no response"), "unsafe"),  # prompt-only rows of the public set
    (wgm(8, U, None, None), ("left", "null label(s)"), "safe"),
    (wgm(9, None, COMP, U), ("left", "null label(s)"), ("left", "prompt_harm_label is null")),
    (wgm(10, " Harmful", "Compliance", "HARMFUL"), "unsafe", "unsafe"),  # labels are case-insensitive
    (wgm(11, U, REF, U, response=""), ("left", "prompt unharmful, refusal, response unharmful"), "safe"),
]


@pytest.mark.parametrize("request_only", [False, True])
def test_wildguardmix_label_rules(request_only):
    for row, in_response_modes, in_request_only in LABEL_TABLE:
        expected = in_request_only if request_only else in_response_modes
        kind, item = classify("f:1", row, request_only=request_only)
        if isinstance(expected, tuple):
            assert (kind, item) == expected, row
        else:
            assert kind == expected and item.label == expected, row
            assert item.prompt == row["prompt"]
            assert item.response == (None if request_only else row["response"])


def test_request_only_ignores_response_fields():
    row = {"prompt": "request #1", "prompt_harm_label": H}  # no response fields at all
    assert classify("f:1", row, request_only=True)[0] == "unsafe"
    with pytest.raises(DataError, match="field 'response': missing"):
        classify("f:1", row)


def test_wildjailbreak_filter():
    rows = [{"prompt": f"harmful request #{i}", "prompt_type": t, "harmless_answer": "I can't help with that.",
             "harmful_answer": f"harmful answer #{i}"} for i, t in enumerate(["harmful", "benign", "harmful", "adversarial_harmful"])]
    out = [parse_pair(f"wj:{i}", r) for i, r in enumerate(rows)]
    assert [k for k, _ in out] == ["pair", "left", "pair", "left"]
    assert out[1][1] == "prompt_type 'benign'"
    assert out[0][1].refusal == "I can't help with that." and out[0][1].harmful == "harmful answer #0"
    row = {"prompt": "harmful request #9", "prompt_type": "harmful", "harmless_answer": " ", "harmful_answer": "x"}
    with pytest.raises(DataError, match=r"wj:9: field 'harmless_answer': empty"):
        parse_pair("wj:9", row)
    assert parse_pair("wj:9", row, request_only=True)[1].refusal is None  # answers unused then


@pytest.mark.parametrize("messages, message", [
    (None, "field 'messages': expected a non-empty list"),
    ([], "field 'messages': expected a non-empty list"),
    (["hi"], r"field 'messages\[0\]': expected an object, got str"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}],
     r"field 'messages\[1\].role': unknown role 'bot' \(expected user/assistant/system\)"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], r"field 'messages\[1\].content': empty"),
    ([{"role": "user", "content": 3}], r"field 'messages\[0\].content': expected a string, got int"),
])
def test_ultrachat_validation(messages, message):
    with pytest.raises(DataError, match=r"^uc:4: " + message):
        parse_chat("uc:4", {"messages": messages})


def test_ultrachat_ok():
    chat = parse_chat("uc:1", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "Hello!", "extra": 1}]})
    assert chat.messages[2] == {"role": "assistant", "content": "Hello!"}


# ---- files ----

def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_errors_name_file_line_and_field(tmp_path, tok):
    good = wgm(0, U, COMP, U)
    cases = [
        ({k: v for k, v in wgm(1, H, COMP, H).items() if k != "prompt_harm_label"},
         "field 'prompt_harm_label': missing (the row has: prompt, response, response_harm_label, "
         "response_refusal_label)"),
        (wgm(1, "maybe", COMP, U), "field 'prompt_harm_label': unknown label 'maybe' (expected harmful/unharmful)"),
        (wgm(1, H, "sure", U), "field 'response_refusal_label': unknown label 'sure' (expected refusal/compliance)"),
        (wgm(1, H, COMP, H, response=""), "field 'response': empty"),  # empty response in a selected (unsafe) row
        (wgm(1, U, COMP, U, prompt=" "), "field 'prompt': empty"),
    ]
    for row, message in cases:
        path = write_jsonl(tmp_path / "wgm.jsonl", [good, good, row])
        with pytest.raises(DataError) as e:
            build_pools(tok, wildguardmix=path)
        assert str(e.value) == f"{path}:3: {message}"
    path = write_jsonl(tmp_path / "wgm.jsonl", [good], raw_lines=["", '{"prompt": "request #2",'])
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON"):  # line 2 is blank: file line numbers
        build_pools(tok, wildguardmix=path)
    # JSON: the row index
    path = tmp_path / "wgm.json"
    path.write_text(json.dumps([good, wgm(1, "maybe", COMP, U)]))
    with pytest.raises(DataError, match=rf"^{path}:row 1: field 'prompt_harm_label': unknown label 'maybe'"):
        build_pools(tok, wildguardmix=str(path))


def test_skip_invalid_counts_reasons(tmp_path, tok):
    rows = [wgm(0, U, COMP, U), wgm(1, "maybe", COMP, U), wgm(2, H, COMP, H, response=""), wgm(3, H, COMP, H),
            wgm(4, H, REF, U), wgm(5, U, REF, U), wgm(6, "maybe", REF, U), wgm(7, H, None, None, response=None)]
    path = write_jsonl(tmp_path / "wgm.jsonl", rows, raw_lines=["not json"])
    pools = build_pools(tok, wildguardmix=path, skip_invalid=True)
    rep = pools.report.sources["wildguardmix"]
    assert rep.rows_read == 9
    assert dict(rep.skipped.counts) == {"unknown label in 'prompt_harm_label'": 2, "empty 'response'": 1,
                                        "malformed JSON": 1}
    assert rep.qualified == {"safe": 2, "unsafe": 1} and rep.taken == {"safe": 2, "unsafe": 1}
    assert dict(rep.left) == {"prompt unharmful, refusal, response unharmful": 1, "no response": 1}
    assert rep.rows_read == sum(rep.qualified.values()) + sum(rep.left.values()) + rep.skipped.total
    assert any(f"{path}:2: field 'prompt_harm_label'" in e for e in rep.skipped.examples)
    assert [s.origin for s in pools.safe] == [f"{path}:1", f"{path}:5"]
    summary = pools.report.summary()
    assert "wildguardmix" in summary and "malformed JSON" in summary and "no response" in summary
    assert pools.report.to_dict()["sources"]["wildguardmix"]["skipped"]["total"] == 4


def _fixture_rows():
    wgm_rows = [row for row, *_ in LABEL_TABLE[:9]] + [wgm(20 + i, U, COMP, U) for i in range(4)]
    wj_rows = [{"prompt": f"harmful request #{i}", "prompt_type": "harmful" if i % 3 else "benign",
                "harmless_answer": "I can't help with that request.", "harmful_answer": f"harmful answer #{i} " * (i + 1)}
               for i in range(7)]
    uc_rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                             {"role": "assistant", "content": f"The answer is {2 * i}."}]} for i in range(5)]
    return wgm_rows, wj_rows, uc_rows


def _write(fmt, path, rows):
    if fmt == "jsonl":
        return write_jsonl(path.with_suffix(".jsonl"), rows)
    if fmt in ("json", "json-data"):
        p = path.with_suffix(".json")
        p.write_text(json.dumps(rows if fmt == "json" else {"data": rows}))
        return str(p)
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = path.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(rows), p)
    return str(p)


def _ids(pools):
    strip = lambda seqs: [(s.input_ids, s.request_len) for s in seqs]  # noqa: E731
    return (strip(pools.safe), strip(pools.unsafe), [strip(p) for p in pools.pair], strip(pools.retain))


@pytest.mark.parametrize("request_only", [False, True])
def test_formats_give_identical_pools(tmp_path, tok, request_only):
    wgm_rows, wj_rows, uc_rows = _fixture_rows()
    results = {}
    for fmt in ("jsonl", "json", "json-data", "parquet"):
        d = tmp_path / fmt
        d.mkdir()
        pools = build_pools(tok, _write(fmt, d / "wgm", wgm_rows), _write(fmt, d / "wj", wj_rows),
                            _write(fmt, d / "uc", uc_rows), spec=RO if request_only else None, max_examples_per_pool=3, seed=1)
        results[fmt] = _ids(pools)
        reports = {k: (v.qualified, v.taken, v.left) for k, v in pools.report.sources.items()}
        results[fmt + " report"] = reports
    for fmt in ("json", "json-data", "parquet"):
        assert results[fmt] == results["jsonl"], fmt
        assert results[fmt + " report"] == results["jsonl report"], fmt
    assert pools.safe[0].origin.startswith(str(tmp_path / "parquet" / "wgm.parquet") + ":row ")


def test_pools_content_and_cap(tmp_path, tok):
    wgm_rows, wj_rows, uc_rows = _fixture_rows()
    paths = [write_jsonl(tmp_path / n, rows) for n, rows in
             (("wgm.jsonl", wgm_rows), ("wj.jsonl", wj_rows), ("uc.jsonl", uc_rows))]
    pools = build_pools(tok, *paths, max_examples_per_pool=None)
    rep = pools.report.sources
    assert (len(pools.safe), len(pools.unsafe), len(pools.pair), len(pools.retain)) == (6, 2, 4, 5)
    assert rep["wildjailbreak"].left == {"prompt_type 'benign'": 3}
    for refusal, harmful in pools.pair:
        assert refusal.request_len == harmful.request_len
        assert refusal.input_ids[:refusal.request_len] == harmful.input_ids[:harmful.request_len]
        assert refusal.input_ids != harmful.input_ids and refusal.origin == harmful.origin
    assert all(s.request_len == 0 for s in pools.retain)
    # request-only: WJ "pairs" are one request twice
    ro = build_pools(tok, *paths, spec=RO)
    assert all(a is b and a.request_len == len(a) for a, b in ro.pair) and ro.request_only
    assert (len(ro.safe), len(ro.unsafe)) == (8, 5)
    # the cap: a seeded subset in file order, per pool
    capped = [build_pools(tok, *paths, max_examples_per_pool=3, seed=s) for s in (0, 0, 5)]
    assert _ids(capped[0]) == _ids(capped[1])
    origins = [[s.origin for s in c.safe] for c in capped]
    assert len(origins[0]) == 3 and origins[0] == sorted(origins[0], key=lambda o: int(o.rsplit(":", 1)[1]))
    assert set(origins[0]) < {s.origin for s in pools.safe}
    assert origins[0] != origins[2]
    assert capped[0].report.sources["wildguardmix"].qualified == {"safe": 6, "unsafe": 2}
    assert capped[0].report.sources["wildguardmix"].taken == {"safe": 3, "unsafe": 2}


def test_truncation_is_reported(tmp_path, tok):
    wgm_rows = [wgm(0, U, COMP, U, prompt="the quick brown fox " * 40), wgm(1, H, COMP, H, response="answer " * 80),
                wgm(2, U, COMP, U)]
    uc = [{"messages": [{"role": "user", "content": "Hello! " * 100}, {"role": "assistant", "content": "Hi."}]}]
    pools = build_pools(tok, write_jsonl(tmp_path / "w.jsonl", wgm_rows), ultrachat=write_jsonl(tmp_path / "u.jsonl", uc), limits=Limits(max_request_tokens=40, max_response_tokens=30,
                                                          max_retain_tokens=50))
    assert pools.report.sources["wildguardmix"].truncated == {"request": 1, "response": 1}
    assert pools.report.sources["ultrachat"].truncated == {"retain": 1}
    assert max(s.request_len for s in pools.safe + pools.unsafe) == 40
    assert pools.unsafe[0].response_len == 30 and len(pools.retain[0]) == 50


def test_sources_dispatch(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        list(read_records(str(tmp_path / "missing.jsonl")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        list(read_records(str(tmp_path / "x.csv")))
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # never touch the network in tests
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        list(read_records("allenai/wildguardmix:wildguardtrain@train"))


def test_report_invariant_without_skips(tmp_path):
    rep = SourceReport("wildguardmix", "x")
    from repbend.data.wildguardmix import read_wildguardmix
    rows = [row for row, *_ in LABEL_TABLE]
    safe, unsafe = read_wildguardmix(write_jsonl(tmp_path / "w.jsonl", rows), rep)
    assert rep.rows_read == len(rows) == sum(rep.qualified.values()) + sum(rep.left.values())
    assert (len(safe), len(unsafe)) == (2, 3)


def test_skip_invalid_covers_template_errors(tmp_path):
    tok = build_tokenizer(template="chatml")
    tok.chat_template = ("{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no') }}"
                         "{% endif %}{% endfor %}" + tok.chat_template)
    uc = [{"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": "Hi."}]}
          for c in ("Hello!", "forbidden word", "Thank you")]
    path = write_jsonl(tmp_path / "u.jsonl", uc)
    with pytest.raises(DataError, match=rf"^{path}:2: the chat template rejected the row: no"):
        build_pools(tok, ultrachat=path)
    rep = build_pools(tok, ultrachat=path, skip_invalid=True).report.sources["ultrachat"]
    assert rep.qualified == {"retain": 2} and rep.taken == {"retain": 2}
    assert dict(rep.skipped.counts) == {"chat template error": 1}
    assert rep.rows_read == sum(rep.qualified.values()) + rep.skipped.total
