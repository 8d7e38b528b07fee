"""benchmarks/bench_step.py: every variant of a method computes the same loss (each term) on the same batch as the
method's reference re-creation, and the run writes its files.

Sizes are cut down (tiny model, --scale 0.125: sequence lengths, the reference's 512/512/1024 padding and the pack
length all divided by 8), and in-process runs skip the reference's gc.collect() calls (eight a step, ~0.1-1 s each
in a process holding pytest and transformers): they are its cost, not its loss.
"""
import csv
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_step as bs  # noqa: E402
from reference_baselines import (CBWidths, RMUReference, build_cb_batch, build_rmu_batch,  # noqa: E402
                                 cb_reference_loss)
from reference_recipe import DYNAMIC, Padding, build_reference_batch, pad_set, reference_loss  # noqa: E402
from step_variants import perturb  # noqa: E402

from repbend.loss import RepBendLoss  # noqa: E402
from repbend.loss.batch import collate  # noqa: E402
from repbend.config import LossConfig  # noqa: E402

SCALE = 0.125
FIXED_SMALL = Padding(64, 64, 128)   # the reference's 512/512/1024 at SCALE


@pytest.fixture(autouse=True)
def no_gc_one_thread(monkeypatch):
    import reference_recipe
    monkeypatch.setattr(reference_recipe, "free_memory", lambda device: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the benchmark's CPU default; more threads on a busy 2-core machine spin and crawl
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    spec = bs.MODELS["tiny"]
    model, n_layers, _ = bs.build_model(spec, torch.device("cpu"), torch.float32, "sdpa", False, 0.05, seed=42)
    micro = bs.micro_batches(spec.vocab, 2, seed=42, count=1, scale=SCALE)[0]
    model.train()
    return model, n_layers, micro


def test_reference_layout_puts_the_last_request_token_at_one_column(setup):
    _, _, micro = setup
    cfg = LossConfig(target_layers=[2, 3])
    ps = pad_set(micro.unsafe, cfg, bs.PAD_ID, FIXED_SMALL)
    assert ps.input_ids.shape == (len(micro.unsafe), 128)
    for b, s in enumerate(micro.unsafe):
        row = ps.input_ids[b][ps.attention_mask[b].bool()].tolist()
        assert row == list(s.input_ids)
        assert ps.input_ids[b, 63].item() == s.input_ids[s.request_len - 1]   # column 511 at full scale
        assert ps.term_mask[b].sum().item() == s.response_len                  # response_all


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_all_variants_compute_the_same_loss(setup, eta):
    model, n_layers, micro = setup
    cfg = LossConfig(target_layers=bs.target_layers(n_layers), eta=eta)
    got = {}
    with bs.dropout_off(model), torch.no_grad():
        for name, pack in (("repbend", round(bs.PACK_LENGTH * SCALE)), ("repbend+padded", None)):
            t = RepBendLoss(cfg)(model, collate(micro, cfg, bs.PAD_ID, pack))
            got[name] = (t.total, t.parts)
        for name, padding in (("reference", FIXED_SMALL), ("reference+dynpad", DYNAMIC)):
            got[name] = reference_loss(model, build_reference_batch(micro, cfg, bs.PAD_ID, padding), cfg, n_layers)
    want_total, want_parts = got["reference"]
    for term in ("safe", "unsafe", "cos", "kl") + (("pair",) if eta else ()):
        assert want_parts[term] is not None and abs(float(want_parts[term])) > 1e-6, term  # every term is exercised
    for name, (total, parts) in got.items():
        torch.testing.assert_close(total, want_total, rtol=1e-4, atol=1e-7, msg=name)
        for term, v in want_parts.items():
            if v is not None:
                torch.testing.assert_close(parts[term], v, rtol=1e-4, atol=1e-7, msg=f"{name}: {term}")


def _baseline(method):
    spec = bs.MODELS["tiny"]
    model, n_layers, _ = bs.build_model(spec, torch.device("cpu"), torch.float32, "sdpa", False, 0.0, seed=42,
                                        method=method)
    micro = bs.micro_batches(spec.vocab, 2, seed=42, count=1, scale=SCALE, method=method)[0]
    return model.train(), n_layers, micro, bs.loss_config(method, n_layers, SCALE)


def test_circuit_breakers_reference_layout():
    _, _, micro, cfg = _baseline("circuit_breakers")
    cb = build_cb_batch(micro, cfg, bs.EOS_ID, CBWidths(128, 128))
    assert cb.forget_ids.shape == (len(micro.unsafe), 256) and cb.retain_ids.shape[1] == cfg.cb_retain_pad_length
    for b, s in enumerate(micro.unsafe):
        assert cb.forget_ids[b][cb.forget_mask[b].bool()].tolist() == list(s.input_ids)
        assert cb.forget_ids[b, 127].item() == s.input_ids[s.request_len - 1]   # requests end at column Wq - 1
    for b, s in enumerate(list(micro.safe) + list(micro.retain)):              # retain: left-padded to P
        assert cb.retain_ids[b, -len(s):].tolist() == list(s.input_ids) and cb.retain_mask[b].sum() == len(s)
    assert cb.useful_tokens == sum(len(s) for s in micro.unsafe + micro.safe + micro.retain)


@pytest.mark.parametrize("progress", [1 / 150, 0.8])
def test_circuit_breakers_reference_computes_the_objective(progress):
    model, n_layers, micro, cfg = _baseline("circuit_breakers")
    with torch.no_grad():
        got = RepBendLoss(cfg)(model, RepBendLoss(cfg).collate(micro, bs.PAD_ID, 128), progress=progress)
        cb = build_cb_batch(micro, cfg, bs.EOS_ID, CBWidths(64, 64))
        total, parts = cb_reference_loss(model, cb, cfg, n_layers, progress)
    assert parts["retain"] > 1e-4 and parts["cb"] > 0.1  # both terms exercised (LoRA B is off zero)
    for k in ("retain", "cb"):
        torch.testing.assert_close(got.parts[k], parts[k], rtol=1e-4, atol=1e-7, msg=k)
    torch.testing.assert_close(got.total, total, rtol=1e-4, atol=1e-7)
    assert len(cfg.target_layers) != len(set(cfg.target_layers))  # the published duplicate is kept


def test_rmu_reference_computes_the_objective():
    model, n_layers, micro, cfg = _baseline("rmu")
    ref_model = bs.build_model(bs.MODELS["tiny"], torch.device("cpu"), torch.float32, "sdpa", False, 0.0, seed=42,
                               method="rmu")[0].train()
    loss_fn = RepBendLoss(cfg)
    perturb(loss_fn.prepare(model), 7)
    ref = RMUReference(cfg)
    params = ref.prepare(ref_model)
    perturb(params, 7)
    assert len(ref_model.model.layers) == cfg.rmu_layer + 1 and all(p.requires_grad for p in ref_model.parameters())
    assert torch.equal(ref.control.view(-1), loss_fn.control_vector.view(-1))
    with torch.no_grad():
        got = loss_fn(model, loss_fn.collate(micro, bs.PAD_ID, 128))
        total, parts = ref.loss(ref_model, build_rmu_batch(micro, bs.PAD_ID))
    assert parts["retain"] > 0 and parts["unlearn"] > 0
    for k in ("unlearn", "retain"):
        torch.testing.assert_close(got.parts[k], parts[k], rtol=1e-4, atol=1e-9, msg=k)
    torch.testing.assert_close(got.total, total, rtol=1e-4, atol=1e-7)


def _check_outputs(out: Path, variants):
    res = json.loads((out / "results.json").read_text())
    assert sorted(res) == sorted(variants)
    methods = [e["method"] for e in res.values()]
    assert methods == sorted(methods, key=methods.index)  # grouped by method
    for v, e in res.items():
        for key in ("step_s", "tokens_per_s", "peak_mem_bytes", "mfu", "loss"):
            assert key in e, (v, key)
        assert e["status"] == "ok", e.get("error")
        assert e["step_s"] > 0 and e["tokens_per_s"] > 0 and e["peak_mem_bytes"] > 0
        assert e["mfu"] is None  # CPU
        assert e["loss_ok"] is True, (v, e["loss_rel_diff"])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["variant"] for r in rows] == list(res)
    png = out / "step_bench.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "table.txt").read_text()
    assert "loss agreement" in text
    # the speed over the summed step times of the same micro-batches, beside the median per-step rate
    want = {v: sum(res[e["reference"]]["step_s_all"]) / sum(e["step_s_all"]) for v, e in res.items()
            if v != e["reference"] and e["reference"] in res}
    line = [ln for ln in text.splitlines() if ln.startswith("x ref over the timed steps' total time")]
    assert len(line) == (1 if want else 0), text
    got = dict(item.rsplit(" ", 1) for item in line[0].split(": ", 1)[1].split(", ")) if want else {}
    assert got.keys() == want.keys() and all(abs(float(got[v]) - x) <= 0.006 for v, x in want.items()), (got, want)
    return res


def test_cli_writes_results_csv_chart_and_json_lines(tmp_path):
    from repbend.bench import main
    rc = main(["--model", "tiny", "--steps", "1", "--warmup", "1", "--scale", str(SCALE), "--device", "cpu",
               "--output", str(tmp_path), "--in-process", "--jsonl", str(tmp_path / "lines.jsonl")])
    assert rc == 0
    res = _check_outputs(tmp_path, bs.VARIANTS)
    for method in bs.METHODS:  # the same batches in every variant of a method
        assert len({e["tokens_per_step"] for e in res.values() if e["method"] == method}) == 1, method
        assert res[bs.REFERENCE_OF[method]]["speedup_vs_reference"] == pytest.approx(1.0)
    lines = [json.loads(x) for x in (tmp_path / "lines.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == [f"tiny/{v}" for v in bs.VARIANTS] + ["tiny/summary"]
    assert all(x["stage"] == "step" and x["status"] == "ok" for x in lines)
    assert set(lines[-1]["variants"]) == set(bs.VARIANTS)


def test_variants_run_in_their_own_process(tmp_path):
    rc = bs.main(["--model", "tiny", "--steps", "1", "--scale", str(SCALE), "--device", "cpu",
                  "--variants", "repbend", "--output", str(tmp_path)])
    assert rc == 0
    res = _check_outputs(tmp_path, ["repbend"])
    assert res["repbend"]["peak_mem_kind"] in ("rss_peak_of_steps", "rss_peak_of_process")
    assert (tmp_path / "worker_repbend.log").exists()


def test_time_budget_records_what_does_not_fit(tmp_path):
    rc = bs.main(["--model", "tiny", "--steps", "1", "--scale", str(SCALE), "--device", "cpu", "--in-process",
                  "--methods", "rmu", "--time-budget", "5", "--output", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0 and {e["status"] for e in res.values()} == {"skipped"}


def test_repbend_bench_entry_point_imports_on_its_own(tmp_path):
    import subprocess
    p = subprocess.run([sys.executable, "-m", "repbend", "bench", "--help"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "--model" in p.stdout and "llama3-8b" in p.stdout and "--methods" in p.stdout


def test_a_worker_per_method_builds_its_model_once(tmp_path):
    """--share-model (on by default on a GPU): consecutive variants of a method run in one worker, which builds the
    model once and puts the trained tensors back as built before each variant (else the reference's loss would
    differ from the method's); a model whose every weight trains (RMU's) is rebuilt."""
    rc = bs.main(["--model", "tiny", "--steps", "1", "--scale", str(SCALE), "--device", "cpu", "--share-model", "on",
                  "--variants", "repbend,reference,repbend+padded,rmu,rmu_reference", "--plan", "off",
                  "--output", str(tmp_path)])
    assert rc == 0
    res = _check_outputs(tmp_path, ["repbend", "reference", "repbend+padded", "rmu", "rmu_reference"])
    assert sorted(p.name for p in tmp_path.glob("worker_*.log")) == ["worker_repbend_and_2.log",
                                                                     "worker_rmu_and_1.log"]
    assert [res[v]["model_reused"] for v in ("repbend", "reference", "repbend+padded")] == [False, True, True]
    assert not res["rmu_reference"]["model_reused"]


def test_every_variant_gets_its_plan(tmp_path):
    rc = bs.main(["--model", "tiny", "--steps", "1", "--scale", str(SCALE), "--device", "cpu", "--in-process",
                  "--variants", "repbend,reference", "--output", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for v, e in res.items():
        assert e["plan_flops_per_token"] > 0 and e["plan_peak_bytes"] > 0 and e["plan_error"] is None, v
    assert res["repbend"]["plan_flops_vs_reference"] < 1 < res["reference"]["plan_flops_per_token"] / \
        res["repbend"]["plan_flops_per_token"]
    text = (tmp_path / "table.txt").read_text()
    assert "GFLOP/tok" in text and "plan GiB" in text


def test_settings_shared_with_train_take_its_spelling():
    """`repbend bench` reads `--train.batch_size 3 --model.dtype bfloat16 ...` as `--batch-size 3 --dtype bf16 ...`."""
    common = ["--device", "cpu", "--methods", "repbend"]
    dashed = bs.parse_args(common + ["--batch-size", "3", "--dtype", "bf16", "--attn", "eager", "--gradient-checkpointing",
                                     "off", "--seed", "7", "--eta", "0.5", "--lora-dropout", "0.1"])
    dotted = bs.parse_args(common + ["--train.batch_size", "3", "--model.dtype", "bfloat16",
                                     "--model.attn_implementation", "eager", "--model.gradient_checkpointing", "false",
                                     "--train.seed", "7", "--loss.eta", "0.5", "--lora.dropout", "0.1"])
    assert vars(dashed) == vars(dotted)
    assert (dotted.batch_size, dotted.dtype, dotted.gradient_checkpointing, dotted.seed) == (3, "bf16", "off", 7)
    with pytest.raises(SystemExit):
        bs.parse_args(common + ["--model.dtype", "float8"])
