"""benchmarks/gpu_check.sh: the dry run on the CPU runs every stage it can and reports the goals as NOT RUN; the
checks it runs on the GPU can fail (a broken kernel, sequences that attend to each other); the summary decides the
goals from the JSON lines alone, also for a run cut short.

The dry run takes about a minute: parity under the Triton interpreter, attention on sdpa/eager, the bandwidth code
paths, the step benchmark of all three methods at the tiny size, and ddp/fsdp under torchrun --nproc_per_node 1.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_attention  # noqa: E402
import gpu_parity  # noqa: E402
import gpu_summary  # noqa: E402
from gpu_records import Records  # noqa: E402

STAGES = ("env", "parity", "attention", "kernels", "step", "dist")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return proc, out, lines


def test_dry_run_passes_every_stage_it_can_run(dry_run):
    proc, out, lines = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:]
    ends = {x["stage"]: x for x in lines if x["name"] == "stage_end"}
    for stage in STAGES:
        assert ends[stage]["exit"] == "0", (stage, proc.stdout[-3000:])
        assert any(x["stage"] == stage and x["status"] == "ok" and x["name"] != "stage_end" for x in lines), stage
    bad = [x for x in lines if x["status"] not in ("ok", "skipped")]
    assert not bad, bad
    # what cannot run on the CPU is said to be skipped, with the reason
    skipped = {(x["stage"], x["name"]): x["error"] for x in lines if x["status"] == "skipped"}
    assert ("kernel_tests", "pytest") in skipped
    assert any(s == "attention" and "flex_attention" in n for s, n in skipped)


def test_dry_run_covers_each_kernel_path_method_and_strategy(dry_run):
    _, _, lines = dry_run
    names = {(x["stage"], x["name"]) for x in lines if x["status"] == "ok"}
    for op in ("rep_distance/list_safe/fp32", "rep_distance/list_safe/bf16", "rep_distance/rmu_expanded/bf16",
               "rep_distance/stacked_mask/fp32", "rep_distance/equal/fp32", "rep_distance/empty/fp32",
               "pairwise_cosine/trainer/fp32", "linear_kl/softcap/fp32", "linear_kl/odd_head_grad/fp32"):
        assert ("parity", op) in names, op
    for name in ("repbend/sdpa/fp32", "repbend/eager/fp32", "circuit_breakers/sdpa/fp32", "rmu/sdpa/fp32"):
        assert ("attention", name) in names, name
    assert ("kernels", "rep_distance/triton") in names and ("kernels", "bench_kernels") in names
    summary = next(x for x in lines if x["stage"] == "step" and x["name"] == "tiny/summary")
    import methods  # benchmarks/ is on sys.path: every method's shipped variant and reference, NPO and DPO included
    want = {v for m in methods.BENCH.values() for v in (m.variants[0], m.references[0])}
    assert {"npo", "dpo_reference"} < want and set(summary["variants"]) == want
    assert all(e["loss_ok"] for e in summary["variants"].values())
    # the plan's prediction beside each measured peak, and its FLOPs per useful token
    assert all(e["plan_peak_bytes"] > 0 and e["plan_flops_per_token"] > 0 for e in summary["variants"].values())
    env = next(x for x in lines if x["stage"] == "env")
    assert env["kernels"] == "triton" and env["triton_launch"] == "ok"
    assert ("flex", "flex_attention") in {(x["stage"], x["name"]) for x in lines if x["status"] == "skipped"}
    dist = {x["name"]: x for x in lines if x["stage"] == "dist"}
    assert dist["repbend/ddp"]["ddp_gradient_averages"] >= dist["repbend/ddp"]["steps"]
    assert dist["repbend/fsdp"]["dtensor_params"] == dist["repbend/fsdp"]["trained_tensors"] > 0


def test_dry_run_outputs_fit_the_device_tool_and_end_with_the_goal_table(dry_run):
    proc, out, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert {"results.jsonl", "gpu_check.log", "summary.txt", "bench_kernels.csv", "step"} <= set(files)
    assert len(files) <= 8 and [p.name for p in out.iterdir() if p.is_dir()] == ["step"]
    # the step stage's detailed results stay (the script once wrote them to a temporary folder it deleted)
    step = {p.name for p in (out / "step").iterdir()}
    assert {"results.json", "table.txt", "plan.json", "plan.log"} <= step
    assert all(p.is_file() for p in (out / "step").iterdir())
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 20 * 2**20
    tail = proc.stdout.strip().splitlines()[-6:]
    assert tail[0].startswith("goal") and tail[-1].startswith("=== gpu_check done")
    goals = tail[1:5]
    assert [g.split()[0] for g in goals] == ["speed", "peak", "MFU", "rep_distance"]
    assert all(g.endswith("NOT RUN (dry run)") for g in goals)
    log = (out / "gpu_check.log").read_text()
    assert "=== dist" in log and "goal" in log and (out / "summary.txt").read_text() in log


# ---------------------------------------------------------------- the checks can fail
def test_parity_check_catches_a_wrong_kernel(monkeypatch, tmp_path):
    import repbend.kernels as k
    from repbend.kernels.reference import RepDistance

    real = k.rep_distance

    def off_by_a_little(hidden, ref, mask, impl="auto"):  # "triton" = eager with a 1e-3 relative error in l2
        out = real(hidden, ref, mask, impl="torch")
        return RepDistance(out.l2 * (1.001 if impl == "triton" else 1.0), *out[1:])
    monkeypatch.setattr(k, "rep_distance", off_by_a_little)
    rec = Records(str(tmp_path / "r.jsonl"), "parity")
    line = gpu_parity.rep_distance_case(rec, "rd", torch.float32, torch.device("cpu"), L=2, R=2, T=8, D=16)
    assert line["status"] == "fail"
    assert any(p.startswith("l2:") for p in line["problems"]) and any("grad_l2" in p for p in line["problems"])
    assert not any(p.startswith("cos") for p in line["problems"])


def test_attention_check_catches_sequences_that_see_each_other(monkeypatch, tmp_path):
    import repbend.loss.passes as passes
    real = passes.attention_inputs

    def no_mask(rows, attn, dtype):  # what flash-attn 2 did with several packed rows: plain causal attention
        kw = real(rows, attn, dtype)
        R, T = rows.input_ids.shape
        kw["attention_mask"] = torch.ones(T, T, dtype=torch.bool).tril().expand(R, 1, T, T)
        return kw
    rec = Records(str(tmp_path / "r.jsonl"), "attention")
    ok = gpu_attention.check(rec, "repbend", "sdpa", torch.float32, torch.device("cpu"), None)
    monkeypatch.setattr(passes, "attention_inputs", no_mask)
    broken = gpu_attention.check(rec, "repbend", "sdpa", torch.float32, torch.device("cpu"), None)
    assert ok["status"] == "ok" and broken["status"] == "fail"
    assert broken["worst_err"] > 1e-3


# ---------------------------------------------------------------- the summary
def _step_summary(repbend: dict, reference: dict) -> dict:
    return {"stage": "step", "name": "llama3-8b/summary", "status": "ok", "t": 1, "bf16_matmul_tflops": 700.0,
            "variants": {"repbend": {"status": "ok", **repbend}, "reference": {"status": "ok", **reference}}}


def _goals(lines, dry_run=False):
    return {g[0]: g for g in gpu_summary.goals(lines, dry_run)}


def test_summary_goals_pass_fail_and_not_run():
    kernel = {"stage": "kernels", "name": "bench_kernels/triton/full/x", "status": "ok", "source": "bench_kernels",
              "provider": "triton", "mode": "full", "L": 11, "D": 4096, "BT": 16384, "N": 3300,
              "mode_frac_copy_bw": 0.85}
    lines = [_step_summary({"tokens_per_s": 10000.0, "peak_mem_bytes": 20 * 2**30, "mfu": 0.35,
                            "mfu_vs_matmul": 0.5}, {"tokens_per_s": 2000.0, "peak_mem_bytes": 45 * 2**30}), kernel]
    g = _goals(lines)
    assert g["speed vs reference"][3] == "PASS" and "5.00x" in g["speed vs reference"][2]
    assert g["peak memory"][3] == "PASS" and g["MFU (989 TFLOP/s)"][3] == "FAIL"
    assert g["rep_distance fwd+bwd"][3] == "PASS" and "85%" in g["rep_distance fwd+bwd"][2]
    assert all(v[3] == "NOT RUN (dry run)" for v in _goals(lines, dry_run=True).values())
    lines[0]["variants"]["reference"] = {"status": "oom"}
    lines[0]["variants"]["repbend"]["peak_mem_bytes"] = 30 * 2**30
    g = _goals(lines[:1])
    assert g["speed vs reference"][3] == "NOT RUN (reference oom)" and g["peak memory"][3] == "FAIL"
    assert g["rep_distance fwd+bwd"][3].startswith("NOT RUN")


def test_summary_of_a_cut_run_reads_the_lines_that_were_written():
    lines = [{"stage": "step", "name": "llama3-8b/repbend", "status": "ok", "t": 1, "tokens_per_s": 9000.0,
              "peak_gib": 21.0, "mfu": 0.42},
             {"stage": "step", "name": "llama3-8b/reference", "status": "ok", "t": 2, "tokens_per_s": 1000.0},
             {"stage": "kernels", "name": "rep_distance/triton", "status": "ok", "t": 3, "fwd_bwd_frac_copy": 0.7,
              "N": 3000, "positions": 16000, "fwd_bwd_gbps": 3000.0}]
    g = _goals(lines)
    assert [g[k][3] for k in g] == ["PASS", "PASS", "PASS", "FAIL"]
    text = gpu_summary.report(lines + [{"stage": "step", "name": "x", "status": "timeout", "t": 0}], False)
    assert "TIMEOUT step/x" in text and text.splitlines()[-1].startswith("rep_distance")


def test_records_write_complete_lines_and_name_an_oom(tmp_path):
    path = tmp_path / "r.jsonl"
    rec = Records(str(path), "s")
    rec.write("a", value=float("nan"), t_=torch.tensor(2.5))
    line = rec.error("b", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert got[0]["value"] == "nan" and got[0]["t_"] == 2.5 and line["status"] == got[1]["status"] == "oom"
    with pytest.raises(ValueError):
        rec.write("c", "fine")


def test_env_falls_back_to_eager_kernels_when_triton_cannot_build(tmp_path):
    """No C compiler (or no Python.h): every Triton path would fail; the env stage says so in one line and tells
    the script to run the rest with REPBEND_KERNELS=torch."""
    impl = tmp_path / "impl"
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_env.py"), "--jsonl", str(tmp_path / "r.jsonl"),
                           "--impl-file", str(impl)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert impl.read_text().strip() == "torch"
    line = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert line["kernels"] == "torch" and "no-such-cc" in line["triton_launch"]
    assert sum("Triton cannot run its kernels here" in x for x in proc.stdout.splitlines()) == 1
    script = (BENCH / "gpu_check.sh").read_text()
    assert "export REPBEND_KERNELS=torch" in script


def test_auto_resolves_to_the_eager_kernels_with_repbend_kernels_torch():
    code = ("import torch; from repbend.kernels._dispatch import resolve_impl; "
            "print(resolve_impl('auto', torch.device('cuda')), resolve_impl('triton', torch.device('cuda')))")
    for value, want in (("torch", "torch triton"), ("", "triton triton")):
        env = {**os.environ, "REPBEND_KERNELS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.split()[-2:] == want.split(), out.stderr
