"""repbend.integrations.hf: RepBendTrainer (a transformers.Trainer with the RepBend loss), its collator and rows,
on the tiny model and the bundled synthetic data (CPU, no download, report_to none).

- two Trainer steps log every loss term and change the adapter (and only the adapter);
- one Trainer step (grad accumulation 1, dropout 0; and 2 with dropout 0.1) gives the terms and the updated LoRA
  tensors of RepBendLoss called directly on the same micro-batches with the dropout seeds of `repbend train`;
- evaluate() runs the loss with dropout off and logs its terms;
- the collator merges rows with their pairs last and aligned; malformed rows name the batch row and the field;
- a DDP-wrapped model runs the loss inside the wrapper's forward (DataParallel: bypassed);
- DDP (torchrun, 2 CPU processes, gloo) gives the logged terms and the adapter of one process with twice the
  gradient accumulation (gradients averaged through DDP, unused adapters included; dropout seeded per micro-batch);
- examples/hf_trainer.py runs.
"""
import copy
import json
import math
import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install '.[test]')")

from transformers import TrainingArguments  # noqa: E402

from repbend.data import Limits, build_pools  # noqa: E402
from repbend.demo.assets import build_tiny_model, build_tokenizer  # noqa: E402
from repbend.demo.synthetic import corpus, write_demo_data  # noqa: E402
from repbend.integrations.hf import (RepBendCollator, RepBendTrainer, merge_micro_batches,  # noqa: E402
                                     micro_batch_dataset, micro_batch_from_row, micro_batch_to_row)
from repbend.loss import LossConfig, RepBendLoss  # noqa: E402
from repbend.model import LoraSettings, attach_lora  # noqa: E402
from repbend.trainer import micro_batch_rng  # noqa: E402

TERMS = ("safe", "unsafe", "cos", "kl", "pair")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = write_demo_data(tmp_path_factory.mktemp("data"), seed=0, n_train=48, n_heldout=8)
    tok = build_tokenizer(corpus())
    pools = build_pools(tok, paths["wildguardmix"], paths["wildjailbreak"], paths["ultrachat"],
                        limits=Limits(max_response_tokens=40, max_retain_tokens=80), seed=0)
    return tok, pools


def _model(tok, dropout: float):
    model = build_tiny_model(tok, seed=1, layers=3, hidden=32, heads=2, kv_heads=1)
    torch.manual_seed(0)  # LoRA A's initialisation draws from the global generator
    model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=dropout), range(3))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B = 0 would make h' == h at step 1: every term should be exercised
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _cfg():
    return LossConfig(target_layers="1-3", eta=0.3)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=1,
                gradient_accumulation_steps=1, learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0,
                max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=7,
                disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _records(trainer, key="loss"):
    return [r for r in trainer.state.log_history if key in r]


def test_two_trainer_steps_log_every_term_and_change_the_adapter(setup, tmp_path):
    tok, pools = setup
    model = _model(tok, dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = micro_batch_dataset(pools, batch_size=2, num_rows=8, seed=3)
    trainer = RepBendTrainer(model=model, args=_args(tmp_path, max_steps=2, per_device_train_batch_size=2,
                                                     gradient_accumulation_steps=2),
                             train_dataset=rows, processing_class=tok, loss=_cfg())
    trainer.train()
    logged = _records(trainer)
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        for t in TERMS:
            assert math.isfinite(r[f"loss_{t}"]) and r[f"loss_{t}"] > 0, (t, r)
    after = dict(trainer.model.named_parameters())
    changed = [n for n, p in after.items() if not torch.equal(p.detach(), before[n])]
    assert changed and all("lora_" in n for n in changed)
    assert len(changed) == sum(p.requires_grad for p in after.values())
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("grad_accum,dropout,method", [(1, 0.0, "repbend"), (2, 0.1, "repbend"),
                                                       (1, 0.0, "circuit_breakers")])
def test_one_trainer_step_equals_the_loss_called_directly(setup, tmp_path, grad_accum, dropout, method):
    """progress = 1.0 in step 1 of 1 (repbend train's (step + 1) / max_steps; circuit_breakers reads it)."""
    tok, pools = setup
    cfg = _cfg() if method == "repbend" else LossConfig(method=method, target_layers="1,3")
    model = _model(tok, dropout)
    direct = copy.deepcopy(model)
    rows = micro_batch_dataset(pools, batch_size=2, num_rows=grad_accum, seed=3)
    trainer = RepBendTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=grad_accum),
                             train_dataset=rows, processing_class=tok, loss=cfg)
    trainer.train()
    (logged,) = _records(trainer)

    loss_fn = RepBendLoss(cfg)
    names = loss_fn.terms
    params = [p for p in direct.parameters() if p.requires_grad]
    direct.train()
    sums = dict.fromkeys(("loss",) + names, 0.0)
    for k in range(grad_accum):  # micro-batch k of the sampler, with the dropout seeds of repbend train
        batch = loss_fn.collate(rows.sampler(k), tok.pad_token_id, 1024)
        with micro_batch_rng(7, k, torch.device("cpu")):
            terms = loss_fn(direct, batch, progress=1.0)
            (terms.total / grad_accum).backward()
        sums["loss"] += float(terms.total.detach()) / grad_accum
        for t in names:
            sums[t] += float(terms.parts[t].detach()) / grad_accum
    for t in names:
        assert logged[f"loss_{t}"] == pytest.approx(sums[t], rel=1e-5, abs=1e-7), t
    assert logged["loss"] == pytest.approx(sums["loss"], rel=1e-4)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0).step()
    got, want = _lora(trainer.model), _lora(direct)
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_evaluate_runs_the_loss_with_dropout_off_and_logs_its_terms(setup, tmp_path):
    tok, pools = setup
    model = _model(tok, dropout=0.3)
    rows = micro_batch_dataset(pools, batch_size=2, num_rows=2, seed=5)
    trainer = RepBendTrainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=1), eval_dataset=rows,
                             processing_class=tok, loss=_cfg())
    metrics = trainer.evaluate()
    loss_fn = RepBendLoss(_cfg())
    model.eval()
    with torch.no_grad():
        terms = [loss_fn(model, loss_fn.collate(rows.sampler(k), tok.pad_token_id, 1024)) for k in range(2)]
    assert metrics["eval_loss"] == pytest.approx(sum(float(t.total) for t in terms) / 2, rel=1e-5)
    for t in TERMS:
        assert metrics[f"eval_loss_{t}"] == pytest.approx(sum(float(x.parts[t]) for x in terms) / 2, rel=1e-5), t


def test_collator_merges_rows_with_the_pairs_last_and_aligned(setup):
    tok, pools = setup
    rows = micro_batch_dataset(pools, batch_size=2, num_rows=4, seed=3, start=5)
    r0, r1 = rows[0], rows[1]
    assert (r0["index"], r1["index"]) == (5, 6)
    loss_fn = RepBendLoss(_cfg())
    out = RepBendCollator(loss_fn, pad_id=tok.pad_token_id, pack_length=64)([r0, json.loads(json.dumps(r1))])
    m0, m1 = rows.sampler(5), rows.sampler(6)
    n0, n1 = m0.n_pairs, m1.n_pairs
    assert n0 == n1 == 2
    merged = merge_micro_batches([m0, m1])
    assert merged.safe == m0.safe[:-n0] + m1.safe[:-n1] + m0.safe[-n0:] + m1.safe[-n1:]
    assert merged.unsafe == m0.unsafe[:-n0] + m1.unsafe[:-n1] + m0.unsafe[-n0:] + m1.unsafe[-n1:]
    assert merged.retain == m0.retain + m1.retain and merged.n_pairs == 4
    for s, u in zip(merged.safe[-4:], merged.unsafe[-4:]):  # a pair: one request, refusal vs harmful answer
        assert s.request_len == u.request_len and s.input_ids[:s.request_len] == u.input_ids[:u.request_len]
    want = loss_fn.collate(merged, tok.pad_token_id, 64)
    got = out["repbend_batch"]
    assert torch.equal(got.input_ids, want.input_ids)
    assert got.input_ids.shape[1] == max(64, max(len(s) for s in merged.retain))  # packed (longer: own row)
    assert got.input_ids.shape[0] < len(merged.safe + merged.unsafe + merged.retain)
    assert got.index.keys() == want.index.keys()
    for k in want.index:
        assert torch.equal(got.index[k], want.index[k]), k
    assert out["rows"].tolist() == [5, 6] and out["micro_batch_index"] == 5
    assert torch.equal(out["input_ids"], got.input_ids)
    assert int(out["attention_mask"].sum()) == got.useful_tokens == sum(
        len(s) for s in merged.safe + merged.unsafe + merged.retain)


def test_rows_round_trip(setup):
    _, pools = setup
    rows = micro_batch_dataset(pools, batch_size=2, num_rows=1, seed=3)
    micro = rows.sampler(0)
    row = json.loads(json.dumps(micro_batch_to_row(micro, 0)))  # plain values: JSON- and Arrow-ready
    assert micro_batch_from_row(row) == micro
    assert micro_batch_from_row(micro) is micro
    with pytest.raises(IndexError):
        rows[1]


def _bad(row, edit):
    row = copy.deepcopy(row)
    edit(row)
    return row


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.pop("retain"), r"batch row 1 \(dataset index 1\): missing field\(s\) retain"),
    (lambda r: r["safe"][1].update(request_len=999), r"field safe\[1\]\.request_len \(synthetic:s1\) = 999 is outside"),
    (lambda r: r["unsafe"][0].update(request_len=0), r"field unsafe\[0\]\.request_len \(synthetic:u0\) = 0"),
    (lambda r: r["retain"][0].update(input_ids=[]), r"field retain\[0\]\.input_ids \(synthetic:r0\) is empty"),
    (lambda r: r["retain"][0].update(input_ids=["a"]), r"field retain\[0\] \(synthetic:r0\): input_ids must be"),
    (lambda r: r["retain"][0].update(input_ids=[1.5, 2]), r"field retain\[0\] \(synthetic:r0\): input_ids must be"),
    (lambda r: r["safe"][0].update(request_len="2"), r"field safe\[0\] \(synthetic:s0\): input_ids must be a list"),
    (lambda r: r.update(n_pairs=3), r"field n_pairs = 3 must be an integer in \[0, 2\]"),
    (lambda r: r.update(safe="x"), r"field safe must be a list"),
    (lambda r: r["safe"].__setitem__(0, [1, 2]), r"field safe\[0\] must be a dict"),
])
def test_a_malformed_row_names_the_batch_row_and_the_field(edit, match):
    def seq(name, i, r):
        return {"input_ids": list(range(1, 7)), "request_len": r, "origin": f"synthetic:{name}{i}"}
    good = {"index": 1, "n_pairs": 1, "safe": [seq("s", 0, 2), seq("s", 1, 3)],
            "unsafe": [seq("u", 0, 2), seq("u", 1, 3)], "retain": [seq("r", 0, 0)]}
    collate = RepBendCollator(_cfg())
    collate([good, good])  # the unedited row is fine
    tensors = copy.deepcopy(good)
    tensors["safe"][0]["input_ids"] = torch.arange(1, 7)  # tensors and numpy integers are integers too
    tensors["n_pairs"] = torch.tensor(1).numpy()[()]
    assert micro_batch_from_row(tensors).safe[0].input_ids == tuple(range(1, 7))
    with pytest.raises(ValueError, match=match):
        collate([good, _bad(good, edit)])
    with pytest.raises(ValueError, match="an empty batch"):
        collate([])
    with pytest.raises(ValueError, match="a row is a dict"):
        collate([good, [1, 2]])


def test_the_trainer_needs_a_peft_model_and_a_repbend_batch(setup, tmp_path):
    tok, pools = setup
    with pytest.raises(TypeError, match="needs a PEFT model.*LlamaForCausalLM"):
        RepBendTrainer(model=build_tiny_model(tok), args=_args(tmp_path), loss=_cfg())
    trainer = RepBendTrainer(model=_model(tok, 0.0), args=_args(tmp_path), loss=_cfg())
    assert trainer.args.remove_unused_columns is False
    with pytest.raises(ValueError, match="no 'repbend_batch'.*input_ids"):
        trainer.compute_loss(trainer.model, {"input_ids": torch.ones(1, 3, dtype=torch.long)})


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_a_ddp_wrapped_model_runs_the_loss_inside_the_wrappers_forward(setup, tmp_path):
    """In this process (gloo, world size 1): the loss runs as the PEFT model's forward inside DDP's forward, whose
    reducer then averages the gradients; nn.DataParallel (one process) is bypassed."""
    tok, pools = setup
    model = _model(tok, dropout=0.0)
    direct = copy.deepcopy(model)
    trainer = RepBendTrainer(model=model, args=_args(tmp_path), loss=_cfg())
    batch = trainer.loss_fn.collate(micro_batch_dataset(pools, 2, 1, seed=3).sampler(0), tok.pad_token_id, 1024)
    want = trainer.loss_fn(direct, batch, progress=1.0)
    want.total.backward()

    calls = []
    torch.distributed.init_process_group("gloo", init_method=(tmp_path / "pg").as_uri(), rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        wrapped.register_forward_pre_hook(lambda module, args: calls.append("ddp"))
        got = trainer._loss_in_forward(wrapped, batch, 1.0)
        assert calls == ["ddp"] and "forward" not in vars(model)  # the PEFT model's own forward is back
        got.total.backward()
    finally:
        torch.distributed.destroy_process_group()
    torch.testing.assert_close(got.total, want.total)
    for t in TERMS:
        torch.testing.assert_close(got.parts[t], want.parts[t])
    grads = {n: p.grad for n, p in direct.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], msg=n)

    parallel = torch.nn.DataParallel(model)
    parallel.register_forward_pre_hook(lambda module, args: calls.append("dp"))
    trainer._loss_in_forward(parallel, batch, 1.0)
    assert calls == ["ddp"]


def test_the_cost_benchmark_runs_and_its_variants_agree(tmp_path):
    """benchmarks/bench_hf_trainer.py, cut down (tiny model, lengths / 8, in this process): the loop, the Trainer
    and the Trainer without packing give the same step-0 loss; the padded layout has more positions per pass."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_hf_trainer
        rc = bench_hf_trainer.main(["--model", "tiny", "--scale", "0.125", "--steps", "1", "--in-process",
                                    "--output", str(tmp_path)])
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert rc == 0, (tmp_path / "table.txt").read_text()
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(res) == {"loop", "trainer", "trainer+padded"} and all(r["status"] == "ok" for r in res.values())
    assert res["trainer"]["positions_per_pass"] == res["loop"]["positions_per_pass"]
    assert res["trainer+padded"]["positions_per_pass"] > res["trainer"]["positions_per_pass"]
    assert "trainer+padded" in (tmp_path / "table.txt").read_text()


def test_the_example_runs(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"))["main"]
    trainer = main(["--output", str(tmp_path), "--steps", "1", "--grad-accum", "1"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith('{"')]
    assert [x["step"] for x in lines] == [1] and all(f"loss_{t}" in lines[0] for t in TERMS)
    assert trainer.state.global_step == 1


# ---------------------------------------------------------------- DDP: this file is also the torchrun worker
def _ddp_worker(out: str, grad_accum: int) -> None:
    """Two steps of B=2 rows on each process, then rank 0 writes its log and adapter to `out`."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    paths = write_demo_data(Path(out) / f"data{rank}", seed=0, n_train=48, n_heldout=8)  # a folder per rank
    tok = build_tokenizer(corpus())
    pools = build_pools(tok, paths["wildguardmix"], paths["wildjailbreak"], paths["ultrachat"],
                        limits=Limits(max_response_tokens=40, max_retain_tokens=80), seed=0)
    rows = micro_batch_dataset(pools, batch_size=2, num_rows=2 * grad_accum * world, seed=3)
    # U = 1..2 with alpha_mode target and no KL term: the adapters of layer 2 get no gradient at all
    cfg = LossConfig(target_layers="1-2", alpha_mode="target", epsilon=0.0, eta=0.3)
    trainer = RepBendTrainer(model=_model(tok, dropout=0.1), args=_args(Path(out), max_steps=2,
                                                                        gradient_accumulation_steps=grad_accum),
                             train_dataset=rows, processing_class=tok, loss=cfg)
    trainer.train()
    if rank == 0:
        (Path(out) / "log.json").write_text(json.dumps(_records(trainer)))
        torch.save(_lora(trainer.model), Path(out) / "lora.pt")
    if torch.distributed.is_initialized():  # leave the gloo group before exit: a group torn down by interpreter
        torch.distributed.barrier()         # shutdown can abort ("terminate called without an active exception")
        torch.distributed.destroy_process_group()
    # Then leave without the interpreter's teardown: the Trainer's DDP objects, freed after their group is gone,
    # hung a rank at exit now and then (torch 2.13, accelerate 1.16). Everything this worker reports is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_ddp_on_two_processes_equals_one_process_with_twice_the_accumulation(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    launches = [[sys.executable, __file__, "--worker", str(one), "2"],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                 "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker", str(two), "1"]]
    # independent: started together, they mostly wait on imports. Each in its own session, so that a hung launch is
    # killed with every process it started (an orphaned worker would hold the output pipe open for ever).
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for cmd in launches]
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        assert proc.returncode == 0, output[-4000:]
    log1, log2 = (json.loads((d / "log.json").read_text()) for d in (one, two))
    assert [r["step"] for r in log2] == [1, 2]
    for a, b in zip(log1, log2):
        for k in ("loss",) + tuple(f"loss_{t}" for t in ("safe", "unsafe", "cos", "pair")):
            assert b[k] == pytest.approx(a[k], rel=1e-5), k
        assert "loss_kl" not in b
    lora1, lora2 = torch.load(one / "lora.pt"), torch.load(two / "lora.pt")
    for n in lora1:
        torch.testing.assert_close(lora2[n], lora1[n], rtol=1e-5, atol=1e-6, msg=n)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _ddp_worker(sys.argv[2], int(sys.argv[3]))


def test_the_example_uses_public_names_only_and_rows_needed():
    """examples/hf_trainer.py imports only names a repbend package exports (its __all__), and a run of
    TrainingArguments reads rows_needed(args) rows."""
    import ast
    import importlib

    from transformers import TrainingArguments

    from repbend.integrations.hf import rows_needed

    tree = ast.parse((ROOT / "examples" / "hf_trainer.py").read_text())
    imported = [(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and (n.module or "").startswith("repbend") for a in n.names]
    assert imported
    for module, name in imported:
        assert name in getattr(importlib.import_module(module), "__all__", ()), f"{module}.{name} is not public"
    args = TrainingArguments(output_dir="unused", max_steps=5, gradient_accumulation_steps=3,
                             per_device_train_batch_size=2, use_cpu=True, report_to="none")
    assert rows_needed(args) == 5 * 3 * 2 * args.world_size
    with pytest.raises(ValueError, match="set TrainingArguments.max_steps"):
        rows_needed(TrainingArguments(output_dir="unused", use_cpu=True, report_to="none"))
