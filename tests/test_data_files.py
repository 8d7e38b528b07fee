"""Bad files, not bad rows: bytes that are not UTF-8, truncated or corrupt Parquet, missing files, Hub failures.
Every one is a one-line DataError naming the file (and line and field where there is one)."""
import json
import sys
import types

import pytest

from repbend.data import DataError, build_pools
from repbend.data.errors import DataFileNotFound
from repbend.data.sources import read_records
from repbend.demo.assets import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(template="llama3")


def row(i, prompt=None):
    return {"prompt": prompt or f"request #{i}", "response": f"answer #{i}", "prompt_harm_label": "unharmful",
            "response_refusal_label": "compliance", "response_harm_label": "unharmful"}


def jsonl_bytes(*lines) -> bytes:
    return b"".join((json.dumps(x).encode() if isinstance(x, dict) else x) + b"\n" for x in lines)


def one_line(err) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_non_utf8_jsonl_names_file_line_and_field(tmp_path, tok):
    bad = json.dumps(row(1)).encode().replace(b"request #1", b"request \xff#1")
    column = bad.index(b"\xff") + 1
    path = tmp_path / "wgm.jsonl"
    path.write_bytes(jsonl_bytes(row(0), bad, row(2)))
    with pytest.raises(DataError) as e:
        build_pools(tok, wildguardmix=str(path))
    assert one_line(e.value) == f"{path}:2: field 'prompt': not valid UTF-8 (byte 0xff at byte column {column})"
    # the same line in a file that also has a malformed line: both skipped and counted, the good rows kept
    path.write_bytes(jsonl_bytes(row(0), bad, b"", b'{"prompt": "x\xc3', b'{"prompt": ', row(5)))
    pools = build_pools(tok, wildguardmix=str(path), skip_invalid=True)
    rep = pools.report.sources["wildguardmix"]
    assert dict(rep.skipped.counts) == {"not valid UTF-8": 2, "malformed JSON": 1}
    assert rep.rows_read == 5 and rep.qualified == {"safe": 2}
    assert [s.origin for s in pools.safe] == [f"{path}:1", f"{path}:6"]
    # a truncated multi-byte character on a line that does not parse: no field to name
    assert f"{path}:4: not valid UTF-8 (byte 0xc3 at byte column 14)" in rep.skipped.examples


def test_non_utf8_json_names_line_and_field(tmp_path):
    path = tmp_path / "uc.json"
    text = json.dumps({"data": [{"messages": [{"role": "user", "content": "hi"}]},
                                {"messages": [{"role": "user", "content": "caf\u00e9"}]}]}, indent=1,
                      ensure_ascii=False)
    data = text.encode().replace("caf\u00e9".encode(), b"caf\xe9")  # Latin-1, not UTF-8
    path.write_bytes(data)
    line = data[:data.index(b"\xe9")].count(b"\n") + 1
    with pytest.raises(DataError) as e:
        list(read_records(str(path), on_error=lambda err: None))  # a whole-file problem is never skipped
    assert one_line(e.value).startswith(f"{path}:{line}: field 'data[1].messages[0].content': not valid UTF-8 "
                                        "(byte 0xe9 at byte column ")


def test_byte_order_mark_is_ignored(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(row(0), row(1)))
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([row(0)]).encode())
    assert [o for o, _ in read_records(str(tmp_path / "a.jsonl"))] == [f"{tmp_path / 'a.jsonl'}:1",
                                                                      f"{tmp_path / 'a.jsonl'}:2"]
    assert [r["prompt"] for _, r in read_records(str(tmp_path / "a.json"))] == ["request #0"]


def _parquet(tmp_path, n=3000):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([row(i) for i in range(n)]), path, row_group_size=1000)
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "not parquet", "empty", "corrupt page"])
def test_broken_parquet_is_a_data_error(tmp_path, tok, damage):
    import pyarrow as pa

    data = _parquet(tmp_path)
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "not parquet":
        data = b"prompt,response\nx,y\n" * 10
    elif damage == "empty":
        data = b""
    else:  # zero a stretch of the first data page; the footer is intact, reading the rows fails
        data = data[:200] + b"\0" * 64 + data[264:]
    path = tmp_path / "wgm.parquet"
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
        build_pools(tok, wildguardmix=str(path))
    assert not isinstance(e.value, pa.ArrowException) and e.value.__cause__ is None
    message = one_line(e.value)
    assert message.startswith(f"{path}: not a readable Parquet file (") or \
        message.startswith(f"{path}:row 0: corrupt Parquet data")
    assert e.value.reason == "corrupt Parquet file"
    # skip_invalid does not hide a broken file
    with pytest.raises(DataError):
        build_pools(tok, wildguardmix=str(path), skip_invalid=True)


def test_missing_file_and_directory(tmp_path, tok):
    missing = tmp_path / "nope" / "wgm.jsonl"
    with pytest.raises(DataFileNotFound) as e:
        build_pools(tok, wildguardmix=str(missing))
    assert isinstance(e.value, DataError) and isinstance(e.value, FileNotFoundError)
    assert one_line(e.value) == f"{missing}: data file not found" and e.value.filename == str(missing)
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"dir\.jsonl: not a file \(expected a data file\)$"):
        list(read_records(str(tmp_path / "dir.jsonl")))


def test_hub_failure_is_one_line(monkeypatch):
    def load_dataset(name, config, split):
        raise FileNotFoundError(f"Couldn't find a dataset script at {name}\nor any data file in the same directory")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError) as e:
        list(read_records("someone/missing:cfg@test"))
    assert one_line(e.value) == ("someone/missing:cfg[test]: cannot be loaded from the Hugging Face Hub "
                                 "(FileNotFoundError: Couldn't find a dataset script at someone/missing)")


def test_hub_spec_without_datasets_is_a_data_error(tmp_path, monkeypatch):
    """A local path without its extension reads as a Hub spec; without `datasets` that is one line, not a crash."""
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError) as e:
        list(read_records("data/wildguardmix"))
    assert isinstance(e.value, ImportError)  # callers that catch ImportError still do
    assert one_line(e.value).startswith("data/wildguardmix: not a local file, and reading it from the Hugging Face "
                                        "Hub needs the `datasets` package")
