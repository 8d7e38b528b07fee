"""repbend.plan's memory accounting: the live-bytes meter agrees with torch's MemTracker on real and fake steps; a
model built on the meta device becomes a fake one with tied weights kept; value-dependent sizes are bounded; and
the LoRA layers keep no fp32 copy of their inputs under autocast (what the plan found at Llama-3-8B), with results
unchanged.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from repbend.model import LoraSettings, attach_lora
from repbend.plan.fake import BoundedSizes, fake_mode, fake_model
from repbend.plan.meter import StepMeter

CFG = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128)


def _model(tie=False, device=None, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(**CFG, tie_word_embeddings=tie)
    if device == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM(cfg).to(dtype)
    return LlamaForCausalLM(cfg).to(dtype)


def _steps(model, ids, n=2):
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(n):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield


def _memtracker_peak(model, ids):
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    mt = mem_tracker.MemTracker()
    opt_steps = _steps(model, ids)
    mt.track_external(model)
    with mt:
        next(opt_steps)
        mt.reset_mod_stats()
        next(opt_steps)
    snap = mt.get_tracker_snapshot("peak")
    return sum(v["Total"] for v in snap.values())


def _meter_peak(model, ids):
    meter = StepMeter()
    meter.adopt(list(model.parameters()) + list(model.buffers()))
    with meter:
        for _ in _steps(model, ids):
            pass
    return meter.peak.bytes


def test_meter_agrees_with_memtracker_on_a_real_step():
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    want = _memtracker_peak(_model(), ids)
    got = _meter_peak(_model(), ids)
    assert abs(got - want) <= 0.003 * want, (got, want)


def test_meter_agrees_with_memtracker_on_a_fake_step():
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    peaks = []
    for measure in (_memtracker_peak, _meter_peak):
        mode = fake_mode()
        model = fake_model(_model(device="meta"), mode)
        with mode:
            peaks.append(measure(model, ids))
    want, got = peaks
    assert want > 1e6 and abs(got - want) <= 0.003 * want, (got, want)


def test_fake_model_keeps_tied_weights():
    mode = fake_mode()
    model = fake_model(_model(tie=True, device="meta"), mode)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    from torch._subclasses.fake_tensor import is_fake
    assert all(is_fake(p) and p.device.type == "cpu" for p in model.parameters())


def test_value_dependent_sizes_take_their_bound_and_values_stay_unreadable():
    mode = fake_mode()
    with mode, BoundedSizes():
        x = torch.empty(3, 5, 7)
        mask = torch.empty(5, 7, dtype=torch.bool)
        assert x[:, mask].shape == (3, 35)
        assert torch.nonzero(mask).shape == (35, 2)
        assert torch.masked_select(x, mask).shape == (105,)
        with pytest.raises(Exception):
            x.sum().item()


def _lora_step(cast: bool | None, autocast: bool = True):
    """A tiny model with fp32 LoRA adapters (dropout 0), bf16 under CPU autocast (or fp32 without): (loss, LoRA
    grads, dtypes of the LoRA A inputs, peak bytes). cast=True forces PEFT's input cast (the behaviour before)."""
    dtype = torch.bfloat16 if autocast else torch.float32
    model = attach_lora(_model(dtype=dtype), LoraSettings(r=4, alpha=8, dropout=0.0), [0, 1, 2])
    if cast:
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m._forward_pre_hooks.clear()
                m.cast_input_dtype_enabled = True
    seen = []
    for name, m in model.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    meter = StepMeter()
    meter.adopt(list(model.parameters()))
    with meter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]
    return loss.detach(), grads, set(seen), meter.peak.bytes


def test_lora_inputs_are_not_copied_to_fp32_under_autocast():
    loss, grads, dtypes, peak = _lora_step(cast=None)
    old_loss, old_grads, old_dtypes, old_peak = _lora_step(cast=True)
    assert old_dtypes == {torch.float32}, "the check is blind: PEFT made no fp32 copy before"
    assert dtypes == {torch.bfloat16}
    assert peak < old_peak
    assert torch.equal(loss, old_loss)
    for g, w in zip(grads, old_grads):
        assert torch.equal(g, w)


def test_without_autocast_lora_inputs_are_cast_as_before():
    """An fp32 model (the CPU default) keeps PEFT's behaviour: the same inputs, the same result."""
    loss, grads, dtypes, _ = _lora_step(cast=None, autocast=False)
    old_loss, old_grads, old_dtypes, _ = _lora_step(cast=True, autocast=False)
    assert dtypes == old_dtypes == {torch.float32}
    assert torch.equal(loss, old_loss)


def test_grouped_query_attention_counts_the_flops_of_its_query_heads():
    """sdpa with fewer KV heads than query heads (Llama-3's layout) is counted as the same attention with the KV heads
    repeated, forward and backward, on every torch the project supports (2.11's formula refused h_kv < h_q)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 9, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, generator=g, requires_grad=True) for _ in range(2))
    counts = []
    for kv in ((k, v), (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))):
        meter = StepMeter()
        with meter, torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, *kv, is_causal=True,
                                                                   enable_gqa=kv[0].shape[1] != 4)
            out.sum().backward()
        counts.append({n: f for n, f in meter.flops_by_op.items() if "attention" in n})
    assert counts[0] == counts[1] and len(counts[0]) == 2, counts
    fwd, bwd = (counts[0][n] for n in sorted(counts[0]))
    assert fwd == 4 * 2 * 4 * 9 * 9 * 8 and 2 * bwd == 5 * fwd, counts  # bwd: five matmuls, the scores recomputed
