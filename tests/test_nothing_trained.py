"""A run that trained nothing is not a success (repbend.train_guard): a gradient of exactly 0 over the first steps,
a run that ends on skipped steps, trained tensors that end where they started. Each one exits non-zero with one
line and keeps what it wrote. The faults are injected into the loss's output (zero, NaN) or come from the schedule,
so the rules are tested whatever setting would cause them."""
import subprocess
import sys

import pytest
import torch

from repbend import train
from repbend.checkpoint import list_checkpoints
from repbend.errors import TrainingError
from repbend.loss import RepBendLoss
from tiny_run import adapter, args, cfg, logged, make_assets, same_tensors


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("guard-assets"))


def _scaled_loss(monkeypatch, factor, from_call=1):
    """The loss's total times `factor` from the `from_call`-th forward on (0: no gradient; NaN: a skipped step)."""
    real, calls = RepBendLoss.forward, {"n": 0}

    def scaled(*a, **k):
        terms = real(*a, **k)
        calls["n"] += 1
        if calls["n"] >= from_call:
            terms.total = terms.total * factor
        return terms
    monkeypatch.setattr(RepBendLoss, "forward", scaled)


def test_a_gradient_of_exactly_zero_over_the_first_steps_stops_the_run(assets, tmp_path, monkeypatch):
    _scaled_loss(monkeypatch, 0.0)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(cfg(assets, out, "--train.max_steps", "20", "--train.save_every", "10"))
    msg = str(e.value)
    assert "nothing can train: the gradient of the trained tensors is exactly 0 at steps 1-3" in msg and "\n" not in msg
    assert [r["step"] for r in logged(out)] == [1, 2, 3] and all(r["grad_norm"] == 0.0 for r in logged(out))
    assert [s for s, _ in list_checkpoints(out)] == [3]  # kept for inspection
    assert not (out / "run.lock").exists()
    # shorter runs: every step counts
    with pytest.raises(TrainingError, match="exactly 0 at step 1 "):
        train(cfg(assets, tmp_path / "one", "--train.max_steps", "1"))


def test_the_zero_gradient_count_survives_a_resume(assets, tmp_path, monkeypatch):
    _scaled_loss(monkeypatch, 0.0)
    out = tmp_path / "run"
    monkeypatch.setenv("REPBEND_FAULT_AT_STEP", "3")  # a crash after the checkpoint of step 2
    with pytest.raises(Exception, match="REPBEND_FAULT_AT_STEP=3"):
        train(cfg(assets, out, "--train.max_steps", "20"))
    monkeypatch.delenv("REPBEND_FAULT_AT_STEP")
    with pytest.raises(TrainingError, match="exactly 0 at steps 1-3"):
        train(cfg(assets, out, "--train.max_steps", "20", "--train.resume", "true"))
    assert [r["step"] for r in logged(out)] == [1, 2, 3]


def test_a_run_that_ends_on_skipped_steps_fails_and_keeps_its_adapter(assets, tmp_path, monkeypatch):
    _scaled_loss(monkeypatch, float("nan"), from_call=2)  # step 1 applied, steps 2-3 non-finite
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(cfg(assets, out, "--train.max_steps", "3"))
    msg = str(e.value)
    assert ("the run ended on 2 skipped steps (steps 2-3 had a non-finite loss or gradient, fewer in a row than "
            "train.max_bad_steps = 5): the saved weights are those of step 1") in msg
    assert [r["skipped"] for r in logged(out)] == [False, True, True]
    kept = adapter(out)  # the adapter is written, and holds step 1's weights: finite, trained (B != 0)
    assert same_tensors(kept, adapter(out, "checkpoints/step-000002/adapter"))
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert any(v.abs().max() > 0 for n, v in kept.items() if "lora_B" in n)
    # every step skipped (e.g. a NaN loss weight): the untrained starting weights
    _scaled_loss(monkeypatch, float("nan"))
    with pytest.raises(TrainingError, match="the saved weights are the untrained starting weights"):
        train(cfg(assets, tmp_path / "all", "--train.max_steps", "2"))
    assert (tmp_path / "all" / "adapter").is_dir()


def test_a_run_whose_tensors_end_where_they_started_fails(assets, tmp_path):
    # warm-up over every step: the only step has learning rate 0; the gradient is not 0
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(cfg(assets, out, "--train.max_steps", "1", "--train.warmup_steps", "1"))
    assert "nothing was trained: 1 step ran (1 applied) and every trained tensor ended exactly where it started" \
        in str(e.value)
    assert logged(out)[0]["grad_norm"] > 0 and logged(out)[0]["lr"] == 0.0
    assert (out / "adapter").is_dir()
    # a healthy run right after passes, and so does a resume that has nothing left to do
    train(cfg(assets, tmp_path / "ok", "--train.max_steps", "2"))
    before = adapter(tmp_path / "ok")
    train(cfg(assets, tmp_path / "ok", "--train.max_steps", "2", "--train.resume", "true"))
    assert same_tensors(adapter(tmp_path / "ok"), before)


def test_the_command_line_exits_non_zero_with_one_line(assets, tmp_path):
    p = subprocess.run([sys.executable, "-m", "repbend", "train",
                        *args(assets, tmp_path / "run", "--train.max_steps", "1", "--train.warmup_steps", "1")],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("repbend: error:")]
    assert len(errors) == 1 and "nothing was trained" in errors[0] and "Traceback" not in p.stderr
