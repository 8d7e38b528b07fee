"""Circuit Breakers: loss and LoRA gradients of `RepBendLoss(method="circuit_breakers")` against the float64 formulas
written here, on a tiny Llama with each sequence run alone (no padding, no packing), at two values of progress;
packed equals unpacked; the schedule's end, empty sets and bad settings."""
import pytest
import torch

from repbend.demo.assets import build_tiny_model, build_tokenizer
from repbend.errors import ConfigError
from repbend.loss import LossConfig, MicroBatch, RepBendLoss, Sequence
from repbend.model import LoraSettings, attach_lora

N_LAYERS = 4


def _model(seed=0, dropout=0.0, attn="sdpa"):
    tok = build_tokenizer()
    base = build_tiny_model(tok, seed=seed, layers=N_LAYERS, hidden=48, heads=4, kv_heads=2)
    base.config._attn_implementation = attn
    model = attach_lora(base, LoraSettings(r=4, alpha=8, dropout=dropout), layers_to_transform=range(N_LAYERS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B starts at 0 (h' == h); move it so that both terms have a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    return model, tok


def _micro(vocab, n_safe=3, n_unsafe=3, n_retain=2, seed=0, max_len=19):
    g = torch.Generator().manual_seed(seed)

    def seq(request_only=False):
        n = int(torch.randint(1, max_len + 1, (1,), generator=g))
        r = 0 if request_only else int(torch.randint(0, n + 1, (1,), generator=g))
        return Sequence(tuple(torch.randint(5, vocab, (n,), generator=g).tolist()), r, "t")
    return MicroBatch(safe=[seq() for _ in range(n_safe)], unsafe=[seq() for _ in range(n_unsafe)],
                      retain=[seq(True) for _ in range(n_retain)])


# ---------------------------------------------------------------- the formulas, in float64
def _hidden(model, s: Sequence, lora: bool) -> list[torch.Tensor]:
    """Every hidden-state index of one sequence run alone: [n, D] float64 each."""
    ids = torch.tensor([s.input_ids])
    if lora:
        out = model(input_ids=ids, output_hidden_states=True)
    else:
        model.eval()
        with torch.no_grad(), model.disable_adapter():
            out = model(input_ids=ids, output_hidden_states=True)
        model.train()
    return [h[0].double() for h in out.hidden_states]


def naive_cb(model, micro: MicroBatch, cfg: LossConfig, progress: float):
    R = list(range(N_LAYERS + 1)) if cfg.retain_layers == "all" else list(cfg.retain_layers)
    C = list(cfg.target_layers)  # duplicates count
    P = cfg.cb_retain_pad_length
    retain_rows = list(micro.safe) + list(micro.retain)
    retain = torch.zeros((), dtype=torch.float64)
    if not retain_rows:  # (the denominator below would be 0; the loss leaves the term out)
        retain_rows, P = [], 1
    for s in retain_rows:
        hl, h = _hidden(model, s, True), _hidden(model, s, False)
        for i in R:
            retain = retain + torch.sqrt(((hl[i] - h[i]) ** 2).sum(-1)).sum()
    retain = retain / (len(R) * max(1, len(retain_rows)) * P)
    cb, n_tokens = torch.zeros((), dtype=torch.float64), 0
    for s in micro.unsafe:
        hl, h = _hidden(model, s, True), _hidden(model, s, False)
        n_tokens += len(s)
        for i in C:
            cos = (hl[i] * h[i]).sum(-1) / (torch.sqrt((hl[i] ** 2).sum(-1)) * torch.sqrt((h[i] ** 2).sum(-1)))
            cb = cb + torch.clamp(cos, min=0).sum()
    cb = cb / (len(C) * n_tokens)
    s = cfg.cb_progress_scale * progress
    total = cfg.cb_alpha * s * retain + cfg.cb_alpha * (1 - s) * cb
    return total, {"retain": retain, "cb": cb}


def _grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def _cfg(**kw):
    base = dict(method="circuit_breakers", target_layers="3,1,3,2", cb_alpha=10.0, cb_progress_scale=0.5,
                cb_retain_pad_length=24)
    base.update(kw)
    return LossConfig(**base)


@pytest.mark.parametrize("progress,impl,retain_layers", [
    (0.2, "torch", "all"), (0.9, "torch", "all"), (0.6, "torch", "4,0,2"),
    (0.5, "triton", "all"),  # the Triton kernel (interpreted on the CPU) inside the real step
])
def test_loss_and_grads_match_the_formulas(progress, impl, retain_layers):
    model, tok = _model()
    cfg = _cfg(retain_layers=retain_layers)
    small = impl == "triton"  # the interpreter runs one program at a time
    micro = _micro(len(tok), *((1, 2, 1) if small else (3, 3, 2)), max_len=6 if small else 19)
    want, want_parts = naive_cb(model, micro, cfg, progress)
    want_g = _grads(model, want)

    fn = RepBendLoss(cfg, impl=impl)
    assert fn.terms == ("retain", "cb")
    got = fn(model, fn.collate(micro, tok.pad_token_id), progress=progress)
    assert set(got.parts) == {"retain", "cb"}
    got_g = _grads(model, got.total)
    for k, v in want_parts.items():
        torch.testing.assert_close(got.parts[k].double(), v, rtol=1e-4, atol=1e-7, msg=f"term {k}")
    torch.testing.assert_close(got.total.double(), want, rtol=1e-4, atol=1e-7)
    assert all(g.abs().max() > 0 for g in want_g[:4]) and sum(bool(g.abs().max() > 0) for g in want_g) > 8
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_schedule_moves_weight_from_rerouting_to_retain():
    model, tok = _model(seed=2)
    micro = _micro(len(tok), seed=4)
    fn = RepBendLoss(_cfg())
    batch = fn.collate(micro, tok.pad_token_id)
    with torch.no_grad():
        early, late = fn(model, batch, progress=0.1), fn(model, batch, progress=1.0)
    for t, s in ((early, 0.05), (late, 0.5)):
        want = 10 * s * t.parts["retain"] + 10 * (1 - s) * t.parts["cb"]
        torch.testing.assert_close(t.total, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(early.parts["cb"], late.parts["cb"])
    # a scale of 1 reaches s = 1 at the last step: the rerouting term has weight 0 and is not computed
    end = RepBendLoss(_cfg(cb_progress_scale=1.0))(model, batch, progress=1.0)
    assert end.parts["cb"] is None and end.parts["retain"] is not None
    with pytest.raises(ValueError, match="progress"):
        fn(model, batch)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(attn):
    model, tok = _model(seed=3, attn=attn)
    micro = _micro(len(tok), n_safe=4, n_unsafe=5, n_retain=3, seed=7)
    fn = RepBendLoss(_cfg())
    plain = fn.collate(micro, tok.pad_token_id)
    packed = fn.collate(micro, tok.pad_token_id, pack_length=40)
    assert packed.rows.packed and packed.input_ids.shape[0] < plain.input_ids.shape[0]
    a = fn(model, plain, progress=0.4)
    ga = _grads(model, a.total)
    b = fn(model, packed, progress=0.4)
    gb = _grads(model, b.total)
    for k in ("retain", "cb"):
        torch.testing.assert_close(b.parts[k], a.parts[k], rtol=1e-5, atol=1e-7)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_a_set_without_rows_is_left_out_only_when_allowed():
    model, tok = _model(seed=5)
    strict = RepBendLoss(_cfg())
    with pytest.raises(ValueError, match=r"circuit_breakers: the weighted term\(s\) cb have no tokens"):
        strict(model, strict.collate(_micro(len(tok), n_safe=2, n_unsafe=0, n_retain=1), tok.pad_token_id),
               progress=0.5)
    fn = RepBendLoss(_cfg(), allow_empty_terms=True)
    no_forget = _micro(len(tok), n_safe=2, n_unsafe=0, n_retain=1)
    t = fn(model, fn.collate(no_forget, tok.pad_token_id), progress=0.5)
    assert t.parts["cb"] is None and t.parts["retain"] is not None
    only_forget = _micro(len(tok), n_safe=0, n_unsafe=1, n_retain=0, max_len=1)  # one row of one token
    assert len(only_forget.unsafe[0]) == 1
    t = fn(model, fn.collate(only_forget, tok.pad_token_id), progress=0.5)
    assert t.parts["retain"] is None
    _, want = naive_cb(model, only_forget, _cfg(), 0.5)
    torch.testing.assert_close(t.parts["cb"].double(), want["cb"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(t.total.double(), 10 * 0.75 * want["cb"], rtol=1e-4, atol=1e-7)


def test_a_retain_row_longer_than_the_pad_length_is_an_error():
    model, tok = _model()
    micro = _micro(len(tok), seed=1, max_len=19)
    longest = max(len(s) for s in micro.safe + micro.retain)
    fn = RepBendLoss(_cfg(cb_retain_pad_length=longest - 1))
    with pytest.raises(ConfigError, match="cb_retain_pad_length"):
        fn(model, fn.collate(micro, tok.pad_token_id), progress=0.5)
    with pytest.raises(ConfigError, match="target_layers"):
        f = RepBendLoss(_cfg(target_layers="2,9"))
        f(model, f.collate(micro, tok.pad_token_id), progress=0.5)
