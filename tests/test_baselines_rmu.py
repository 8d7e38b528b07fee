"""RMU: `RepBendLoss(method="rmu")` against the float64 formulas written here (each sequence run alone through the
trained model and through an untouched copy of the original), loss and gradients of the trained tensors; prepare
(which tensors, frozen rest, control vector), the swap of the frozen copies (back exactly), no layer past the one
read ever runs, the reference pass reads only the retain rows, packed equals unpacked, autocast, saved weights."""
import copy

import pytest
import torch

from repbend.demo.assets import build_tiny_model, build_tokenizer
from repbend.errors import ConfigError
from repbend.loss import LossConfig, MicroBatch, RepBendLoss, Sequence
from repbend.methods.rmu import load_rmu_weights
from repbend.model import enable_checkpointing

N_LAYERS = 5


def _model(seed=0, attn="sdpa"):
    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=seed, layers=N_LAYERS, hidden=48, heads=4, kv_heads=2)
    model.config._attn_implementation = attn
    return model.train(), tok


def _cfg(**kw):
    base = dict(method="rmu", rmu_layer=3, rmu_update_layers="2,0-1", rmu_alpha=40.0, steering_coeff=3.0,
                rmu_seed=5, rmu_trainable=["mlp.down_proj.weight", "self_attn.o_proj.weight"])
    base.update(kw)
    return LossConfig(**base)


def _micro(vocab, n_safe=3, n_unsafe=3, n_retain=2, seed=0, max_len=19):
    g = torch.Generator().manual_seed(seed)

    def seq(request_only=False):
        n = int(torch.randint(1, max_len + 1, (1,), generator=g))
        r = 0 if request_only else int(torch.randint(0, n + 1, (1,), generator=g))
        return Sequence(tuple(torch.randint(5, vocab, (n,), generator=g).tolist()), r, "t")
    return MicroBatch(safe=[seq() for _ in range(n_safe)], unsafe=[seq() for _ in range(n_unsafe)],
                      retain=[seq(True) for _ in range(n_retain)])


def _prepared(seed=0, attn="sdpa", impl="torch", **kw):
    """(model, tokenizer, loss, trained tensors, untouched original): the trained tensors moved off the original,
    as after some updates."""
    model, tok = _model(seed, attn)
    original = copy.deepcopy(model).eval()
    fn = RepBendLoss(_cfg(**kw), impl=impl)
    params = fn.prepare(model)
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, tok, fn, params, original


# ---------------------------------------------------------------- the formulas, in float64
def _control(D, coeff, seed):
    u = torch.rand(1, 1, D, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return (u / torch.norm(u) * coeff).reshape(D)


def naive_rmu(model, original, micro: MicroBatch, cfg: LossConfig):
    L = cfg.rmu_layer
    D = model.config.hidden_size
    c = _control(D, cfg.steering_coeff, cfg.rmu_seed).double()

    def h(m, s):
        return m(input_ids=torch.tensor([s.input_ids]), output_hidden_states=True).hidden_states[L][0].double()
    forget, retain_rows = list(micro.unsafe), list(micro.safe) + list(micro.retain)
    unlearn = sum(((h(model, s) - c) ** 2).sum() for s in forget)
    unlearn = unlearn / (len(forget) * max(map(len, forget)) * D)
    with torch.no_grad():
        ref = [h(original, s) for s in retain_rows]
    retain = sum(((h(model, s) - r) ** 2).sum() for s, r in zip(retain_rows, ref))
    retain = retain / (len(retain_rows) * max(map(len, retain_rows)) * D)
    return unlearn + cfg.rmu_alpha * retain, {"unlearn": unlearn, "retain": retain}


@pytest.mark.parametrize("impl,pack", [("torch", None), ("torch", 30), ("triton", None)])
def test_loss_and_grads_match_the_formulas(impl, pack):
    small = impl == "triton"  # the interpreter runs one program at a time
    model, tok, fn, params, original = _prepared(impl=impl)
    micro = _micro(len(tok), *((1, 2, 1) if small else (3, 4, 2)), max_len=6 if small else 19)
    want, want_parts = naive_rmu(model, original, micro, fn.cfg)
    want_g = torch.autograd.grad(want, params)
    got = fn(model, fn.collate(micro, tok.pad_token_id, pack_length=pack))
    assert fn.terms == ("unlearn", "retain") and set(got.parts) == {"unlearn", "retain"}
    got_g = torch.autograd.grad(got.total, params)
    for k, v in want_parts.items():
        torch.testing.assert_close(got.parts[k].double(), v, rtol=1e-4, atol=1e-8, msg=f"term {k}")
    torch.testing.assert_close(got.total.double(), want, rtol=1e-4, atol=1e-8)
    for a, b in zip(got_g, want_g):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_prepare_returns_the_listed_tensors_and_freezes_the_rest():
    model, _ = _model()
    fn = RepBendLoss(_cfg())
    params = fn.prepare(model)
    layers = model.model.layers
    want = [t for i in (0, 1, 2) for t in (layers[i].mlp.down_proj.weight, layers[i].self_attn.o_proj.weight)]
    assert len(params) == len(want) and all(p is w for p, w in zip(params, want))
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in want}
    assert fn.objective.names[0] == "model.layers.0.mlp.down_proj.weight"
    c = fn.control_vector
    D = model.config.hidden_size
    assert c.dtype == torch.bfloat16 and c.shape == (D,) and bool((c >= 0).all())
    assert torch.equal(c, _control(D, 3.0, 5))
    assert float(c.float().norm()) == pytest.approx(3.0, rel=1e-2)
    assert not torch.equal(c, _control(D, 3.0, 6))
    with pytest.raises(RuntimeError, match="once"):
        fn.prepare(model)


def test_prepare_rejects_bad_settings(caplog):
    model, _ = _model()
    with pytest.raises(ConfigError, match="rmu_trainable"):
        RepBendLoss(_cfg(rmu_trainable=["mlp.nope.weight"])).prepare(model)
    with pytest.raises(ConfigError, match="rmu_update_layers"):
        RepBendLoss(_cfg(rmu_update_layers="3-5")).prepare(model)
    with pytest.raises(ConfigError, match="rmu_layer"):
        RepBendLoss(_cfg(rmu_layer=6)).prepare(model)
    for seed in (-1, 2 ** 64):  # torch.Generator would fail at step 1 (negative) or overflow
        with pytest.raises(ConfigError, match="rmu_seed"):
            _cfg(rmu_seed=seed)
    _cfg(rmu_seed=2 ** 64 - 1)
    from repbend.model import LoraSettings, attach_lora
    with pytest.raises(ConfigError, match="plain model"):
        RepBendLoss(_cfg()).prepare(attach_lora(_model()[0], LoraSettings(), [0]))
    # the published recipe's layer 7 comes after the index it reads: warned, and it gets no gradient
    model, tok = _model()
    fn = RepBendLoss(_cfg(rmu_layer=2, rmu_update_layers="0-2", rmu_trainable=["mlp.down_proj.weight"]))
    with caplog.at_level("WARNING", logger="repbend"):
        params = fn.prepare(model)
    assert "get no gradient" in caplog.text
    fn(model, fn.collate(_micro(len(tok)), tok.pad_token_id)).total.backward()
    assert [p.grad is not None for p in params] == [True, True, False]


@pytest.mark.parametrize("pack", [None, 24])
def test_swap_back_is_exact_and_no_layer_past_the_read_one_runs(pack):
    model, tok, fn, params, _ = _prepared(seed=1)
    before = [(p.data_ptr(), p.detach().clone()) for p in params]
    frozen = [f.clone() for f in fn.objective._frozen]
    layers = model.model.layers
    calls = {i: 0 for i in range(N_LAYERS)}
    first_rows = []
    hooks = [layers[i].register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i in range(N_LAYERS)]
    hooks.append(model.lm_head.register_forward_hook(lambda *a: pytest.fail("the LM head ran")))
    hooks.append(model.model.embed_tokens.register_forward_hook(lambda m, a, o: first_rows.append(a[0].shape)))
    micro = _micro(len(tok), n_safe=2, n_unsafe=5, n_retain=1, seed=3)
    batch = fn.collate(micro, tok.pad_token_id, pack_length=pack)
    try:
        fn(model, batch).total.backward()
    finally:
        for h in hooks:
            h.remove()
    L = fn.cfg.rmu_layer
    assert calls == {i: (2 if i < L else 0) for i in range(N_LAYERS)}
    # the reference pass ran on the retain set's rows only, the trained pass on every row
    n_ref = batch.reference_rows
    assert 0 < n_ref < batch.input_ids.shape[0]
    assert [s[0] for s in first_rows] == [n_ref, batch.input_ids.shape[0]]
    for p, (ptr, value) in zip(params, before):
        assert p.data_ptr() == ptr and torch.equal(p.detach(), value) and p.grad is not None
    for f, g in zip(fn.objective._frozen, frozen):
        assert torch.equal(f, g)
    assert not any(torch.equal(f, p.detach()) for f, p in zip(frozen, params))


def test_packed_equals_unpacked_eager_attention():
    model, tok, fn, params, _ = _prepared(seed=2, attn="eager")
    micro = _micro(len(tok), n_safe=4, n_unsafe=4, n_retain=2, seed=9)
    plain = fn.collate(micro, tok.pad_token_id)
    packed = fn.collate(micro, tok.pad_token_id, pack_length=40)
    assert packed.rows.packed
    a = fn(model, plain)
    ga = torch.autograd.grad(a.total, params)
    b = fn(model, packed)
    gb = torch.autograd.grad(b.total, params)
    for k in ("unlearn", "retain"):
        torch.testing.assert_close(b.parts[k], a.parts[k], rtol=1e-5, atol=1e-8)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def test_autocast_does_not_reuse_the_frozen_weights_casts():
    # autocast caches its cast of each parameter object; the reference pass casts the frozen weights through the
    # same objects, so a stale cast would give the trained pass the original weights (retain term 0)
    model, tok, fn, params, _ = _prepared(seed=4)
    batch = fn.collate(_micro(len(tok), seed=2), tok.pad_token_id)
    plain = fn(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = fn(model, batch)
    assert float(plain.parts["retain"]) > 0
    torch.testing.assert_close(cast.parts["retain"], plain.parts["retain"], rtol=0.1, atol=0)


def test_saved_weights_load_into_a_fresh_model(tmp_path):
    model, tok, fn, params, original = _prepared(seed=6)
    fn.objective.save_weights(model, tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["rmu_weights.json", "rmu_weights.safetensors"]
    fresh = copy.deepcopy(original)
    names = load_rmu_weights(fresh, tmp_path / "w")
    assert names == fn.objective.names
    got, want = dict(fresh.named_parameters()), dict(model.named_parameters())
    for n, p in original.named_parameters():
        assert torch.equal(got[n], want[n]), n
        assert torch.equal(got[n], p) == (n not in names), n
    assert fn.objective.merged_model(model) is model
    with pytest.raises(ConfigError, match="not an RMU"):
        load_rmu_weights(fresh, tmp_path)


def test_a_set_without_rows_is_left_out_only_when_allowed():
    model, tok, fn, params, original = _prepared(seed=7)
    with pytest.raises(ValueError, match=r"rmu: the weighted term\(s\) retain have no tokens"):
        fn(model, fn.collate(_micro(len(tok), n_safe=0, n_unsafe=2, n_retain=0, seed=1), tok.pad_token_id))
    fn.method.allow_empty_terms = True
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        no_retain = _micro(len(tok), n_safe=0, n_unsafe=2, n_retain=0, seed=1)
        t = fn(model, fn.collate(no_retain, tok.pad_token_id))
        assert t.parts["retain"] is None and len(calls) == 1  # no reference pass at all
        # (the formula needs a retain row to run; its value is not used here)
        _, want = naive_rmu(model, original, MicroBatch([], no_retain.unsafe, [Sequence((5,), 0)]), fn.cfg)
        torch.testing.assert_close(t.total.double(), want["unlearn"], rtol=1e-4, atol=1e-8)
        no_forget = _micro(len(tok), n_safe=1, n_unsafe=0, n_retain=1, seed=2, max_len=1)  # rows of one token
        t = fn(model, fn.collate(no_forget, tok.pad_token_id))
        assert t.parts["unlearn"] is None
        _, want = naive_rmu(model, original, MicroBatch(no_forget.safe, [Sequence((5,), 0)], no_forget.retain),
                            fn.cfg)
        torch.testing.assert_close(t.total.double(), fn.cfg.rmu_alpha * want["retain"], rtol=1e-4, atol=1e-8)
    finally:
        hook.remove()


def test_gradient_checkpointing_leaves_loss_and_grads_unchanged():
    model, tok, fn, params, _ = _prepared(seed=8)
    batch = fn.collate(_micro(len(tok), seed=5), tok.pad_token_id, pack_length=32)
    a = fn(model, batch)
    ga = torch.autograd.grad(a.total, params)
    enable_checkpointing(model)
    b = fn(model, batch)
    gb = torch.autograd.grad(b.total, params)
    torch.testing.assert_close(b.total, a.total, rtol=1e-6, atol=0)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-8)
