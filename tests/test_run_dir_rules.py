"""One run per output directory, and nothing removed before a run is sure to start (docs/checkpoints.md): the lock,
overwrite's late removal, a directory with no step, branches (from another directory, from an older checkpoint),
rotation over complete checkpoints only, a full disk, an output directory that cannot be one, and what a resume
compares (the base model's weights, the row layout)."""
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

from repbend import train
from repbend.checkpoint import list_checkpoints, save_checkpoint, verify
from repbend.data.errors import DataError
from repbend.demo.assets import save_tiny_model_dir
from repbend.demo.synthetic import corpus
from repbend.errors import TrainingError, UserError
from repbend.loss import RepBendLoss
from tiny_run import adapter, cfg, logged, make_assets, same_tensors


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("rundir-assets"))


def _steps(out):
    return [r["step"] for r in logged(out)]


def _saved(out):
    return [s for s, _ in list_checkpoints(out)]


# ---------------------------------------------------------------- the lock
def _proc_start(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[-1].split()[19]


def _write_lock(out, pid, proc_start):
    (out / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier",
                                              "proc_start": proc_start}))


def test_two_runs_at_once_into_one_directory_the_second_is_refused(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    inside, go_on = threading.Event(), threading.Event()
    real = RepBendLoss.forward

    def waits(*a, **k):  # the first run sits in its first step until the second one has tried
        inside.set()
        assert go_on.wait(60)
        return real(*a, **k)
    monkeypatch.setattr(RepBendLoss, "forward", waits)
    first = {}
    thread = threading.Thread(target=lambda: first.setdefault("result", train(cfg(assets, out))))
    thread.start()
    try:
        assert inside.wait(120)
        for extra in ([], ["--train.overwrite", "true"], ["--train.resume", "true"]):
            with pytest.raises(TrainingError, match=rf"train.output_dir {out} is in use by another run \(pid "
                                                    rf"{os.getpid()} on host"):
                train(cfg(assets, out, *extra))
    finally:
        go_on.set()
        thread.join(120)
    assert first["result"].steps == 2 and _steps(out) == [1, 2] and _saved(out) == [1, 2]
    assert not (out / "run.lock").exists()  # released at the end


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_a_stale_lock_is_detected_and_taken_over(assets, tmp_path, caplog):
    out = tmp_path / "run"
    train(cfg(assets, out))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(out, live.pid, _proc_start(live.pid))  # a live run on this host holds it
        with pytest.raises(TrainingError, match=rf"in use by another run \(pid {live.pid} on host"):
            train(cfg(assets, out, "--train.resume", "true", "--train.max_steps", "3"))
        assert _steps(out) == [1, 2]
    finally:
        live.kill()
        live.wait()
    # a killed run's lock: its pid is gone; a pid now used by another process: its start time differs
    for pid, start in ((int(gone.stdout), "1"), (os.getpid(), "1")):
        _write_lock(out, pid, start)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="repbend"):
            train(cfg(assets, out, "--train.resume", "true", "--train.max_steps", str(_steps(out)[-1] + 1)))
        assert "stale lock" in caplog.text and f"pid {pid}" in caplog.text
        assert not (out / "run.lock").exists()
    assert _steps(out) == [1, 2, 3, 4]


# ---------------------------------------------------------------- what a fresh run may remove, and when
def test_overwrite_removes_the_old_run_only_once_the_new_one_is_sure_to_start(assets, tmp_path):
    out = tmp_path / "run"
    train(cfg(assets, out))
    before = adapter(out)
    for extra in (["--data.ultrachat", str(tmp_path / "typo.jsonl")],   # a typo'd data path
                  ["--loss.target_layers", "1-9"]):                    # a layer past the model's last
        with pytest.raises((UserError, DataError)):
            train(cfg(assets, out, "--train.overwrite", "true", *extra))
        assert same_tensors(adapter(out), before) and _steps(out) == [1, 2] and _saved(out) == [1, 2]
        assert not (out / "run.lock").exists()  # released by the failed run
    train(cfg(assets, out, "--train.overwrite", "true", "--train.seed", "3"))
    assert _steps(out) == [1, 2] and not same_tensors(adapter(out), before)


def test_a_directory_that_holds_no_step_is_not_a_run(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def fails(*a, **k):
        raise RuntimeError("a failure in step 1")
    monkeypatch.setattr(RepBendLoss, "forward", fails)
    with pytest.raises(RuntimeError, match="a failure in step 1"):
        train(cfg(assets, out))
    assert (out / "log.jsonl").read_text() == "" and (out / "config.yaml").exists()  # logging had started
    monkeypatch.undo()
    train(cfg(assets, out))  # the fixed rerun, without --train.overwrite
    assert _steps(out) == [1, 2]


# ---------------------------------------------------------------- branches
def test_a_resume_from_another_directory_starts_a_new_branch(assets, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(cfg(assets, a, "--train.max_steps", "3", "--train.keep_checkpoints", "0"))
    train(cfg(assets, b, "--train.seed", "5"))
    b_adapter, b_log = adapter(b), logged(b)
    point = a / "checkpoints" / "step-000001"
    with pytest.raises(TrainingError, match=r"is not a checkpoint of train.output_dir .* which holds another run "
                                            r"\(checkpoints/, log.jsonl, adapter/\): resuming it there starts a new "
                                            r"branch"):
        train(cfg(assets, b, "--train.resume", str(point), "--train.max_steps", "3"))
    assert same_tensors(adapter(b), b_adapter) and logged(b) == b_log and _saved(b) == [1, 2]
    # into an empty directory: A's step 1 logged, then steps 2-3 retrace A's
    train(cfg(assets, c, "--train.resume", str(point), "--train.max_steps", "3"))
    assert logged(c)[0] == logged(a)[0] and _steps(c) == [1, 2, 3] and _saved(c) == [2, 3]
    assert same_tensors(adapter(c), adapter(a))
    # --train.overwrite true: the branch replaces B's run
    train(cfg(assets, b, "--train.resume", str(point), "--train.max_steps", "3", "--train.overwrite", "true"))
    assert same_tensors(adapter(b), adapter(a)) and _steps(b) == [1, 2, 3] and _saved(b) == [2, 3]


def test_a_branch_from_an_older_checkpoint_fences_the_newer_ones(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(cfg(assets, out, "--train.max_steps", "3", "--train.keep_checkpoints", "0"))
    old_end = adapter(out)
    # branch at step 1 with another learning rate, and crash in step 2
    branch = ("--train.lr", "3e-3", "--train.allow_config_change", "true", "--train.max_steps", "3")
    monkeypatch.setenv("REPBEND_FAULT_AT_STEP", "2")
    with pytest.raises(Exception, match="REPBEND_FAULT_AT_STEP=2"):
        train(cfg(assets, out, "--train.resume", str(out / "checkpoints" / "step-000001"), *branch))
    monkeypatch.delenv("REPBEND_FAULT_AT_STEP")
    assert _saved(out) == [1] and _steps(out) == [1] and not (out / "adapter").exists()
    (fenced,) = (out / "abandoned").iterdir()
    assert sorted(p.name for p in (fenced / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert same_tensors(adapter(fenced), old_end)
    assert [json.loads(x)["step"] for x in (fenced / "log.jsonl").read_text().splitlines()] == [2, 3]
    # `--train.resume true` continues the branch, not the abandoned step 3; the log holds one trajectory
    train(cfg(assets, out, "--train.resume", "true", *branch))
    assert _steps(out) == [1, 2, 3] and _saved(out) == [2, 3]
    assert [r["lr"] for r in logged(out)] == pytest.approx([1e-3, 3e-3, 3e-3])
    assert not same_tensors(adapter(out), old_end)


def test_rotation_counts_complete_checkpoints_only(tmp_path):
    def save(step, keep):
        save_checkpoint(tmp_path, step, save_adapter=lambda d: d.mkdir(), state={"step": step, "x": torch.ones(999)},
                        config={"step": step}, keep=keep)

    def corrupt(step):
        state = tmp_path / "checkpoints" / f"step-{step:06d}" / "state.pt"
        state.write_bytes(state.read_bytes()[:100])
    save(1, 0)
    save(5, 0)
    corrupt(5)   # a corrupt newest checkpoint, from an abandoned future
    save(2, 1)   # keep 1: the one just written stays (and 5 is not this trajectory's to count)
    assert _saved(tmp_path) == [2, 5] and verify(tmp_path / "checkpoints" / "step-000002") is None
    save(3, 2)
    corrupt(3)
    save(4, 2)   # a corrupt older one never pushes a good one out: 2 and 4 stay
    assert _saved(tmp_path) == [2, 4, 5]


# ---------------------------------------------------------------- a full disk, an impossible output directory
class _FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, path, room):
        self.fh, self.room = open(path, "wb"), room

    def write(self, b):
        if len(b) > self.room:
            self.fh.write(bytes(b[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.fh.write(b)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_write(assets, tmp_path, monkeypatch):
    import repbend.checkpoint as ckpt_mod
    out = tmp_path / "run"
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):  # state.pt: the disk fills 4 KiB into it (torch.save is real)
        if str(path).endswith("state.pt") and "w" in mode:
            return _FullDisk(path, 4096)
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(ckpt_mod, "open", full_disk_open, raising=False)
    with pytest.raises(TrainingError) as e:
        train(cfg(assets, out))
    msg = str(e.value)
    assert "no space left on device" in msg and str(out / "checkpoints" / "step-000001") in msg and "\n" not in msg
    assert list((out / "checkpoints").iterdir()) == []  # the partial step-000001.tmpPID/ is gone
    assert not (out / "run.lock").exists()


def test_an_output_dir_that_cannot_be_a_run_directory_is_one_line_before_the_model_loads(assets, tmp_path,
                                                                                          monkeypatch):
    import repbend.trainer as trainer_mod

    def no_load(*a, **k):
        raise AssertionError("the model loaded")
    monkeypatch.setattr(trainer_mod, "load_model", no_load)
    f = tmp_path / "a_file"
    f.write_text("x")
    for out in (f, f / "sub"):
        with pytest.raises(UserError, match="is not a directory"):
            train(cfg(assets, out))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(UserError, match="not writable"):
            train(cfg(assets, ro / "run"))


# ---------------------------------------------------------------- what a resume compares
def test_resume_refuses_a_base_model_replaced_at_the_same_path(tmp_path):
    assets = make_assets(tmp_path / "assets")
    out = tmp_path / "run"
    train(cfg(assets, out))
    model_dir = assets[0]
    sizes = {p.name: p.stat().st_size for p in sorted(os.scandir(model_dir), key=lambda p: p.name)}
    save_tiny_model_dir(model_dir, corpus=corpus(), seed=1, layers=2, hidden=32, heads=2, kv_heads=1)
    assert {p.name: p.stat().st_size for p in os.scandir(model_dir)} == sizes  # same names and sizes, other weights
    with pytest.raises(TrainingError, match=r"run.model_fingerprint \"\w+\" -> \"\w+\""):
        train(cfg(assets, out, "--train.resume", "true", "--train.max_steps", "3"))
    assert _steps(out) == [1, 2]
    train(cfg(assets, out, "--train.resume", "true", "--train.max_steps", "3", "--train.allow_config_change", "true"))
    changes = [json.loads(x) for x in (out / "config_changes.jsonl").read_text().splitlines()]
    assert [c["changes_trajectory"] for c in changes if c["key"] == "run.model_fingerprint"] == [True]


def test_the_row_layout_is_a_trajectory_setting(assets, tmp_path):
    packed, padded = tmp_path / "packed", tmp_path / "padded"
    train(cfg(assets, packed, "--train.max_steps", "1"))
    train(cfg(assets, padded, "--train.max_steps", "1", "--train.packing", "false"))
    # at the default LoRA dropout another layout draws other masks: another step
    assert not same_tensors(adapter(packed), adapter(padded))
    for extra, change in ((["--train.packing", "false"], "train.packing true -> false"),
                          (["--train.pack_length", "64"], "train.pack_length 1024 -> 64")):
        with pytest.raises(TrainingError, match=change):
            train(cfg(assets, packed, "--train.resume", "true", "--train.max_steps", "2", *extra))


def test_the_model_fingerprint_reads_contents_not_times_and_finds_a_cached_hub_model(assets, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants
    from repbend.run_dir import model_fingerprint
    local = tmp_path / "m"
    shutil.copytree(assets[0], local)
    fp = model_fingerprint(str(local))
    os.utime(local / "model.safetensors", (1, 1))  # a copy with other times: the same model
    assert model_fingerprint(str(local)) == fp
    # a hub name is read from its snapshot in the hub cache, never from the network
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(local, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert model_fingerprint("org/tiny") == fp and model_fingerprint("org/not-cached") is None
    # one changed byte in the last MiB of a weight file
    weights = snapshot / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 1
    weights.write_bytes(bytes(data))
    assert model_fingerprint("org/tiny") != fp
