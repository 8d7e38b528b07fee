"""torchrun on the CPU (gloo, 2 processes, the tiny model, 3 steps a launch):

- DDP and FSDP2 with grad_accum 1 give the losses and the adapter of one process with grad_accum 2 (the same
  micro-batches: index (step*grad_accum + k)*world + rank);
- a rank that raises ends the whole job promptly, non-zero, with its error in the output;
- the run it interrupted resumes from its last checkpoint to the losses and adapter of an uninterrupted run.

LoRA dropout is at its default (0.05): the masks of a micro-batch come from a generator seeded by (seed, micro-batch
index), so they are the same whichever rank computes the micro-batch.
The independent launches start together: on a small CI machine they mostly wait on imports.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from repbend import RepBendConfig, train
from repbend.checkpoint import list_checkpoints
from repbend.demo.assets import save_tiny_model_dir
from repbend.demo.synthetic import corpus, write_demo_data

pytestmark = pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

LAUNCH_TIMEOUT_S = 300   # a hung job fails the test instead of the CI run
TERMS = ("safe", "unsafe", "cos", "kl", "pair")
# adapters past the last hidden state the loss reads get no gradient: torch's DDP wrapper fails on this
UNUSED_ADAPTERS = ("--loss.alpha_mode", "target", "--loss.epsilon", "0", "--loss.target_layers", "1-2")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-assets")
    paths = write_demo_data(root / "data", seed=0, n_train=48, n_heldout=8)
    model_dir = save_tiny_model_dir(root / "model", corpus=corpus(), layers=3, hidden=32, heads=2, kv_heads=1)
    return model_dir, paths


def _args(assets, out, *extra) -> list[str]:
    model_dir, paths = assets
    return ["--model.path", model_dir, "--data.wildguardmix", paths["wildguardmix"],
            "--data.wildjailbreak", paths["wildjailbreak"], "--data.ultrachat", paths["ultrachat"],
            "--train.output_dir", str(out), "--train.max_steps", "3", "--train.batch_size", "1",
            "--train.lr", "1e-3", "--lora.r", "4", "--loss.target_layers", "1-3",
            "--loss.eta", "0.3", "--train.progress", "false", "--train.tensorboard", "false",
            "--train.save_every", "1", "--data.max_response_tokens", "48", "--data.max_retain_tokens", "96", *extra]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


PROBE = Path(__file__).with_name("dist_rank_probe.py")


class Launch:
    """`torchrun --nproc_per_node 2 -m repbend train ...` in the background, its output in a file. With `probe` (a
    directory), each rank runs `dist_rank_probe.py` instead of `-m repbend`: the same `main`, then the names of the
    threads the rank still has are written there (rank-R.json)."""

    def __init__(self, args, port: int, log: Path, env: dict | None = None, probe: Path | None = None):
        entry = ["-m", "repbend"] if probe is None else [str(PROBE)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), *entry, "train", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        if probe is not None:
            probe.mkdir(parents=True, exist_ok=True)
            env["REPBEND_PROBE_DIR"] = str(probe)
        self.probe = probe
        self.log = log
        self._fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env)
        self.ended_at = None

    def wait(self) -> int:
        try:
            rc = self.proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"torchrun did not end within {LAUNCH_TIMEOUT_S} s (a hang?):\n{self.output[-4000:]}")
        finally:
            self._fh.close()
        self.ended_at = self.ended_at or time.monotonic()
        return rc

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _watch(launch: Launch, path: Path, seen: dict) -> threading.Thread:
    """Record when `path` appears and when the launch ends (polled every 50 ms)."""
    def run():
        while launch.proc.poll() is None:
            if "at" not in seen and path.exists():
                seen["at"] = time.monotonic()
            time.sleep(0.05)
        launch.ended_at = time.monotonic()
        seen.setdefault("at", time.monotonic() if path.exists() else None)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _adapter(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def _assert_same_run(got, want, rtol, atol=1e-7):
    """The losses, gradient norms and adapters of two runs agree. FSDP2 sums the gradient norm over shards, one
    ulp off the one-process norm; clipping and Adam carry that to ~1e-6 on weights whose gradient is tiny."""
    a, b = _log(got), _log(want)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=rtol, abs=1e-9), (k, ra["step"], ra[k], rb[k])
        for k in TERMS:
            if rb[k] is None:
                assert ra[k] is None, (k, ra["step"])
            else:  # abs: the KL of two nearly equal distributions, in fp32, carries ~1e-4 relative rounding noise
                assert ra[k] == pytest.approx(rb[k], rel=rtol, abs=5e-6), (k, ra["step"], ra[k], rb[k])
    wa, wb = _adapter(got), _adapter(want)
    assert wa.keys() == wb.keys() and wa
    for n in wb:
        torch.testing.assert_close(wa[n], wb[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Three launches at once (ddp, fsdp, fsdp with rank 1 failing at step 3), and meanwhile, in this process,
    the one-process references with grad_accum 2; the resume of the crashed run starts as soon as it ended."""
    root = tmp_path_factory.mktemp("dist-runs")
    ports = _free_ports(3)
    out = {name: root / name for name in ("ddp", "fsdp", "crash", "one_ddp", "one_fsdp")}
    launches = {
        "ddp": Launch(_args(assets, out["ddp"], "--distributed.strategy", "ddp", "--train.grad_accum", "1",
                            *UNUSED_ADAPTERS), ports[0], root / "ddp.txt", probe=root / "ddp-threads"),
        "fsdp": Launch(_args(assets, out["fsdp"], "--distributed.strategy", "fsdp", "--train.grad_accum", "1"),
                       ports[1], root / "fsdp.txt", probe=root / "fsdp-threads"),
        "crash": Launch(_args(assets, out["crash"], "--distributed.strategy", "fsdp", "--train.grad_accum", "1"),
                        ports[2], root / "crash.txt",
                        env={"REPBEND_FAULT_AT_STEP": "3", "REPBEND_FAULT_RANK": "1", "REPBEND_DIST_TIMEOUT": "900"}),
    }
    checkpoint_2 = {}
    watcher = _watch(launches["crash"], out["crash"] / "checkpoints" / "step-000002" / "state.pt", checkpoint_2)
    try:
        train(RepBendConfig.load(None, _args(assets, out["one_ddp"], "--train.grad_accum", "2", *UNUSED_ADAPTERS)))
        train(RepBendConfig.load(None, _args(assets, out["one_fsdp"], "--train.grad_accum", "2")))
        rcs = {"crash": launches["crash"].wait()}
        watcher.join(timeout=5)
        left = {"checkpoints": [s for s, _ in list_checkpoints(out["crash"])],
                "logged": [r["step"] for r in _log(out["crash"])] if (out["crash"] / "log.jsonl").exists() else None}
        launches["resume"] = Launch(_args(assets, out["crash"], "--distributed.strategy", "fsdp",
                                          "--train.grad_accum", "1", "--train.resume", "true"),
                                    _free_ports(1)[0], root / "resume.txt")
        rcs.update({name: launch.wait() for name, launch in launches.items() if name != "crash"})
    except BaseException:
        for launch in launches.values():
            if launch.proc.poll() is None:
                launch.proc.kill()
        raise
    return {"out": out, "launches": launches, "rc": rcs, "checkpoint_2_at": checkpoint_2.get("at"), "crash_left": left}


def test_ddp_equals_one_process_with_accumulation(runs):
    assert runs["rc"]["ddp"] == 0, runs["launches"]["ddp"].output[-4000:]
    # the replicated LoRA gradients are averaged exactly as one process accumulates: bit for bit here
    _assert_same_run(runs["out"]["ddp"], runs["out"]["one_ddp"], rtol=1e-6)
    # no term reads past hidden state 2: layer 2's adapters got no gradient and kept their start (B = 0)
    last = {n: v for n, v in _adapter(runs["out"]["ddp"]).items() if ".layers.2." in n and "lora_B" in n}
    assert last and all(v.abs().max() == 0 for v in last.values())


def test_fsdp_equals_one_process_and_saves_a_peft_adapter(runs, assets):
    assert runs["rc"]["fsdp"] == 0, runs["launches"]["fsdp"].output[-4000:]
    out = runs["out"]["fsdp"]
    _assert_same_run(out, runs["out"]["one_fsdp"], rtol=1e-5, atol=2e-6)
    # rank 0 alone wrote the log, the checkpoints (full tensors, both ranks' RNG) and the adapter
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    state = torch.load(out / "checkpoints" / "step-000003" / "state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert all(not hasattr(v, "device_mesh") for v in state["trainable"].values())
    moments = [v for per_param in state["optimizer"]["state"].values() for v in per_param.values()]
    assert moments and all(not hasattr(v, "device_mesh") for v in moments)  # the optimizer state is whole too
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ids = torch.randint(5, 300, (1, 12))
    with torch.no_grad():
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets[0]), str(out / "adapter"))(ids)
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets[0]),
                                         str(runs["out"]["one_fsdp"] / "adapter"))(ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)


def test_a_failing_rank_ends_the_job_promptly_with_its_error(runs):
    launch = runs["launches"]["crash"]
    text = launch.output
    assert runs["rc"]["crash"] != 0
    assert "InjectedFault" in text and "injected failure on rank 1" in text, text[-4000:]
    # the survivor did not sit in a collective until the 900 s process-group timeout: torchrun ended it
    assert runs["checkpoint_2_at"] is not None, text[-4000:]
    assert launch.ended_at - runs["checkpoint_2_at"] < 60
    assert runs["crash_left"] == {"checkpoints": [1, 2], "logged": [1, 2]}


def test_fsdp_resume_after_the_crash_gives_the_uninterrupted_run(runs):
    assert runs["rc"]["fsdp"] == 0 and runs["rc"]["crash"] != 0
    launch = runs["launches"]["resume"]
    assert runs["rc"]["resume"] == 0, launch.output[-4000:]
    assert "resumed from" in launch.output and "at step 2" in launch.output
    _assert_same_run(runs["out"]["crash"], runs["out"]["fsdp"], rtol=1e-6)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads' names from Linux's /proc")
def test_a_finished_rank_has_left_its_process_group(runs):
    """When `main` returns, the group's backend is gone with its threads: nothing of it is left for the interpreter's
    C++ teardown, where a live gloo group now and then aborts a finished rank (SIGABRT) and fails the job. Without
    `repbend.distributed.bind_world_defaults`, `_release_meshes` and the CLI's gc.collect(), torch kept it alive
    (both strategies). On torch < 2.13 an FSDP2 strategy cache still holds it; `repbend.cli.console_main` covers
    that by leaving with os._exit, which this probe (it calls `main`) does not use."""
    for name in ("ddp", "fsdp"):
        assert runs["rc"][name] == 0, runs["launches"][name].output[-4000:]
        for rank in (0, 1):
            seen = json.loads((runs["launches"][name].probe / f"rank-{rank}.json").read_text())
            threads = seen["threads"]
            assert seen["left_group"] and "python" in threads  # the main thread: the names were read
            if name == "fsdp" and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13):
                continue
            assert not [t for t in threads if "gloo" in t], (name, rank, threads)


def test_console_main_leaves_a_finished_rank_without_the_teardown(monkeypatch, capsys):
    """`python -m repbend` and the `repbend` command: after a run that left its process group, os._exit with
    main's code, output flushed; otherwise an ordinary exit."""
    import repbend.cli as cli
    import repbend.distributed as rd

    class Exited(BaseException):
        pass

    ended = []

    def fake_exit(code):
        ended.append((code, capsys.readouterr().out))  # what was printed had reached the stream
        raise Exited

    monkeypatch.setattr(rd.os, "_exit", fake_exit)
    monkeypatch.setattr(cli, "main", lambda: print("adapter: somewhere") or 3)
    monkeypatch.setattr(rd, "_GROUP_LEFT", True)
    with pytest.raises(Exited):
        cli.console_main()
    assert ended == [(3, "adapter: somewhere\n")]
    monkeypatch.setattr(rd, "_GROUP_LEFT", False)
    with pytest.raises(SystemExit) as e:
        cli.console_main()
    assert e.value.code == 3 and len(ended) == 1


def test_fault_hook_reads_its_environment(monkeypatch):
    from repbend.config import DistributedConfig
    from repbend.distributed import InjectedFault, init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("REPBEND_FAULT_AT_STEP", "2")
    monkeypatch.setenv("REPBEND_FAULT_RANK", "1")
    assert init_distributed(DistributedConfig(), "cpu").fault_at_step is None  # rank 0 is not named
    monkeypatch.setenv("REPBEND_FAULT_RANK", "0,1")
    dist = init_distributed(DistributedConfig(), "cpu")
    dist.fault_point(1)
    with pytest.raises(InjectedFault, match="REPBEND_FAULT_AT_STEP=2"):
        dist.fault_point(2)


def test_two_processes_resumed_on_one_with_twice_the_accumulation_is_bit_exact(runs, assets, tmp_path, caplog):
    """The checkpoint of 2 processes (grad_accum 1) resumed by 1 process with grad_accum 2: the same micro-batches and
    dropout masks (both functions of the micro-batch index), so step 3 is the 2-process run's step 3: gradient norm
    and weights bit for bit (the logged loss and terms are means summed in another order: float32's last bit), and
    the log says so."""
    import logging
    assert runs["rc"]["ddp"] == 0
    ddp = runs["out"]["ddp"]
    out = tmp_path / "one"
    with caplog.at_level(logging.INFO, logger="repbend"):
        train(RepBendConfig.load(None, _args(assets, out, "--train.grad_accum", "2", *UNUSED_ADAPTERS,
                                             "--train.resume", str(ddp / "checkpoints" / "step-000002"))))
    assert "written by 2 processes and this run has 1" in caplog.text and "the same steps" in caplog.text
    a, b = _log(out), _log(ddp)
    assert [r["step"] for r in a] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert [ra[k] for k in ("grad_norm", "lr", "skipped")] == [rb[k] for k in ("grad_norm", "lr", "skipped")]
        for k in ("loss",) + TERMS:
            assert ra[k] == (None if rb[k] is None else pytest.approx(rb[k], rel=1e-6)), (k, ra["step"])
    wa, wb = _adapter(out), _adapter(ddp)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wb)
