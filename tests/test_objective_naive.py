"""The trainer's loss and LoRA gradients equal those of a deliberately naive implementation of the reference
recipe (docs/method.md), written here from scratch: separate forwards per set and per pass, requests left-padded
and responses right-padded to fixed lengths, all hidden states stacked, full-vocabulary fp32 logits."""
import pytest
import torch
import torch.nn.functional as F

from repbend.loss import LossConfig, MicroBatch, RepBendLoss, Sequence
from repbend.loss.batch import collate
from repbend.demo.assets import build_tiny_model, build_tokenizer
from repbend.model import LoraSettings, attach_lora, enable_checkpointing

REQ_PAD, RESP_PAD, RETAIN_PAD = 24, 24, 48
N_LAYERS = 4


def _seq(rng, req_len, resp_len, vocab):
    ids = torch.randint(5, vocab, (req_len + resp_len,), generator=rng).tolist()
    return Sequence(tuple(ids), req_len, "test")


def make_micro(B, vocab, seed=0, request_only=False, max_len=20):
    rng = torch.Generator().manual_seed(seed)
    L = lambda lo, hi: int(torch.randint(lo, min(hi, max(lo, max_len)) + 1, (1,), generator=rng))  # noqa: E731
    resp = (lambda: 0) if request_only else (lambda: L(3, 20))
    wgm_safe = [_seq(rng, L(3, 20), resp(), vocab) for _ in range(B)]
    wgm_unsafe = [_seq(rng, L(3, 20), resp(), vocab) for _ in range(B)]
    pairs = []
    n_pairs = 0 if request_only else B
    for _ in range(n_pairs):
        req = _seq(rng, L(3, 20), 0, vocab).input_ids
        refusal = _seq(rng, 0, L(3, 20), vocab).input_ids
        harmful = _seq(rng, 0, L(3, 20), vocab).input_ids
        pairs.append((Sequence(req + refusal, len(req), "t"), Sequence(req + harmful, len(req), "t")))
    if request_only:
        safe = wgm_safe + [_seq(rng, L(3, 20), 0, vocab) for _ in range(B)]
        unsafe = wgm_unsafe + [_seq(rng, L(3, 20), 0, vocab) for _ in range(B)]
    else:
        safe = wgm_safe + [p[0] for p in pairs]
        unsafe = wgm_unsafe + [p[1] for p in pairs]
    retain = [_seq(rng, 0, L(5, 40), vocab) for _ in range(B)]
    return MicroBatch(safe=safe, unsafe=unsafe, retain=retain, n_pairs=n_pairs)


# ---------------------------------------------------------------- the naive recipe
def _pad_request_response(seqs, pad):
    """Reference layout: request left-padded to REQ_PAD, response right-padded to RESP_PAD."""
    ids = torch.full((len(seqs), REQ_PAD + RESP_PAD), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    resp_mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, s in enumerate(seqs):
        req, res = s.input_ids[:s.request_len], s.input_ids[s.request_len:]
        ids[b, REQ_PAD - len(req):REQ_PAD] = torch.tensor(req)
        att[b, REQ_PAD - len(req):REQ_PAD] = 1
        if res:
            ids[b, REQ_PAD:REQ_PAD + len(res)] = torch.tensor(res)
            att[b, REQ_PAD:REQ_PAD + len(res)] = 1
            resp_mask[b, REQ_PAD:REQ_PAD + len(res)] = True
    return ids, att, resp_mask


def _mode_mask(mode, att, resp_mask, R):
    req_mask = att.bool() & ~resp_mask
    m = torch.zeros_like(resp_mask)
    if mode == "request_last":
        m[:, REQ_PAD - 1] = True
    elif mode == "request_all":
        m = req_mask
    elif mode == "request_response":
        m = att.bool()
    elif mode == "response_all":
        m = resp_mask
    elif mode == "response_one":
        m[:, REQ_PAD] = resp_mask[:, REQ_PAD]
    elif mode == "response_R":
        m[:, REQ_PAD:REQ_PAD + R] = resp_mask[:, REQ_PAD:REQ_PAD + R]
    return m


def _hidden(model, ids, att, lora: bool):
    if lora:
        model.train()
        out = model(input_ids=ids, attention_mask=att, output_hidden_states=True)
    else:
        model.eval()
        with torch.no_grad(), model.disable_adapter():
            out = model(input_ids=ids, attention_mask=att, output_hidden_states=True)
        model.train()
    return torch.stack(out.hidden_states), out.logits.float()  # [L+1, B, T, D], [B, T, V]


def naive_loss(model, micro, cfg: LossConfig, pad):
    n_idx = N_LAYERS + 1
    U = list(cfg.target_layers)
    S = list(range(n_idx)) if cfg.alpha_mode == "all" else U
    ids_s, att_s, resp_s = _pad_request_response(micro.safe, pad)
    ids_u, att_u, resp_u = _pad_request_response(micro.unsafe, pad)
    h_s_ref, _ = _hidden(model, ids_s, att_s, lora=False)
    h_s, _ = _hidden(model, ids_s, att_s, lora=True)
    h_u_ref, _ = _hidden(model, ids_u, att_u, lora=False)
    h_u, _ = _hidden(model, ids_u, att_u, lora=True)

    m_s = _mode_mask(cfg.mode, att_s, resp_s, cfg.response_r)
    m_u = _mode_mask(cfg.mode, att_u, resp_u, cfg.response_r)
    norms_s = (h_s[S] - h_s_ref[S]).norm(dim=-1)  # [|S|, 2B, T]
    l_safe = (norms_s * m_s).sum() / (len(S) * m_s.sum())
    norms_u = (h_u[U] - h_u_ref[U]).norm(dim=-1)
    l_unsafe = (norms_u * m_u).sum() / (len(U) * m_u.sum())

    last = F.normalize(h_u[U][:, :, REQ_PAD - 1], dim=-1)  # [|U|, 2B, D]
    n = last.shape[1]
    cos = last @ last.transpose(1, 2)
    off = ~torch.eye(n, dtype=torch.bool)
    l_cos = (1 - cos[:, off]).mean(dim=1).mean()

    B = len(micro.retain)
    ids_r = torch.full((B, RETAIN_PAD), pad, dtype=torch.long)
    att_r = torch.zeros_like(ids_r)
    for b, s in enumerate(micro.retain):
        ids_r[b, :len(s.input_ids)] = torch.tensor(s.input_ids)
        att_r[b, :len(s.input_ids)] = 1
    _, z = _hidden(model, ids_r, att_r, lora=False)
    _, z_lora = _hidden(model, ids_r, att_r, lora=True)
    T = cfg.temperature
    kl = F.kl_div(F.log_softmax(z_lora / T, -1), F.softmax(z / T, -1), reduction="none").sum(-1)
    l_kl = (kl * att_r).sum() / B * T * T

    terms = {"safe": l_safe, "unsafe": l_unsafe, "cos": l_cos, "kl": l_kl, "pair": None}
    total = cfg.alpha * l_safe - cfg.beta * l_unsafe + cfg.gamma * l_cos + cfg.epsilon * l_kl
    if micro.n_pairs:
        P = micro.n_pairs
        resp_lens = [s.response_len for s in micro.safe[-P:] + micro.unsafe[-P:]]
        R = min(cfg.paired_repr_length, min(resp_lens))
        sl = slice(REQ_PAD - 1, REQ_PAD - 1 + R)
        d = (h_u[U][:, -P:, sl] - h_s_ref[U][:, -P:, sl]).norm(dim=-1)  # [|U|, P, R]
        terms["pair"] = d.mean()
        total = total + cfg.eta * terms["pair"]
    return total, terms


# ---------------------------------------------------------------- the test
def _model(seed=0):
    tok = build_tokenizer()
    base = build_tiny_model(tok, seed=seed, layers=N_LAYERS, hidden=64, heads=4, kv_heads=2)
    model = attach_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0), layers_to_transform=range(N_LAYERS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B starts at 0 (h' == h); move it so that every term has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, tok


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("mode,alpha_mode,impl", [
    ("response_all", "all", "torch"), ("response_all", "target", "torch"), ("request_response", "all", "torch"),
    ("response_R", "all", "torch"), ("response_one", "target", "torch"), ("request_last", "all", "torch"),
    ("request_all", "target", "torch"),
    ("response_all", "all", "triton"),  # the Triton kernels (interpreted on the CPU) inside the real step
])
def test_loss_and_grads_match_naive_recipe(mode, alpha_mode, impl):
    torch.manual_seed(0)
    model, tok = _model()
    cfg = LossConfig(mode=mode, alpha_mode=alpha_mode, target_layers="2-3", alpha=0.5, beta=0.5, gamma=0.1,
                     epsilon=0.3, eta=0.0 if mode.startswith("request_") and mode != "request_response" else 0.7,
                     response_r=5)
    # the Triton interpreter runs one program at a time: keep its micro-batch small
    micro = make_micro(B=1 if impl == "triton" else 3, vocab=len(tok), request_only=cfg.request_only,
                       max_len=6 if impl == "triton" else 20)
    model.train()
    want, want_terms = naive_loss(model, micro, cfg, tok.pad_token_id)
    want_g = _grads(model, want)

    batch = collate(micro, cfg, tok.pad_token_id)
    got = RepBendLoss(cfg, impl=impl)(model, batch)
    got_g = _grads(model, got.total)

    for k, v in want_terms.items():
        if v is None or (k == "pair" and cfg.eta == 0):
            continue
        torch.testing.assert_close(got.parts[k], v, rtol=1e-4, atol=1e-6, msg=f"term {k}")
    torch.testing.assert_close(got.total, want, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in want_g)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["response_all", "request_last"])
def test_packing_does_not_change_the_loss(mode):
    model, tok = _model(seed=3)
    cfg = LossConfig(mode=mode, target_layers="1-3", eta=0.0 if mode == "request_last" else 0.7)
    micro = make_micro(B=3, vocab=len(tok), seed=5, request_only=cfg.request_only)
    model.train()
    plain = collate(micro, cfg, tok.pad_token_id)
    packed = collate(micro, cfg, tok.pad_token_id, pack_length=64)
    n_seqs = len(micro.safe) + len(micro.unsafe) + len(micro.retain)
    assert plain.shape[0] == n_seqs and packed.shape[0] < n_seqs // 2  # really packed
    assert packed.useful_tokens == plain.useful_tokens
    a = RepBendLoss(cfg, impl="torch")(model, plain)
    ga = _grads(model, a.total)
    b = RepBendLoss(cfg, impl="torch")(model, packed)
    gb = _grads(model, b.total)
    for k, v in a.parts.items():
        if v is not None:
            torch.testing.assert_close(b.parts[k], v, rtol=1e-4, atol=1e-6, msg=f"term {k}")
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    model, tok = _model(seed=4)
    cfg = LossConfig(target_layers="1-3", eta=0.5)
    batch = collate(make_micro(B=2, vocab=len(tok), seed=2), cfg, tok.pad_token_id)
    model.train()
    a = RepBendLoss(cfg, impl="torch")(model, batch)
    ga = _grads(model, a.total)
    enable_checkpointing(model)
    assert model.base_model.model.model.gradient_checkpointing
    b = RepBendLoss(cfg, impl="torch")(model, batch)
    gb = _grads(model, b.total)
    torch.testing.assert_close(b.total, a.total, rtol=1e-5, atol=1e-7)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
