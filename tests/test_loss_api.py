"""The public loss API, called exactly as documented, against float64 formulas written here: every term and the LoRA
gradients of a tiny PEFT model. And `repbend.loss` imports no data readers, CLI or evaluation code."""
import subprocess
import sys

import torch

from repbend.demo.assets import build_tiny_model, build_tokenizer
from repbend.loss import LossConfig, MicroBatch, RepBendLoss, Sequence
from repbend.model import LoraSettings, attach_lora

N_LAYERS = 3


def _model():
    tok = build_tokenizer()
    base = build_tiny_model(tok, seed=7, layers=N_LAYERS, hidden=32, heads=2, kv_heads=1)
    model = attach_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0), layers_to_transform=range(N_LAYERS))
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():  # LoRA's B starts at 0 (h' == h); move it so that every term has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train(), tok


def _micro(vocab: int) -> MicroBatch:
    g = torch.Generator().manual_seed(9)
    ids = lambda n: tuple(torch.randint(5, vocab, (n,), generator=g).tolist())  # noqa: E731
    safe = [Sequence(ids(9), 5, "wgm"), Sequence(ids(6) + ids(5), 6, "wj")]
    unsafe = [Sequence(ids(13), 4, "wgm"), Sequence(safe[1].input_ids[:6] + ids(8), 6, "wj")]
    retain = [Sequence(ids(11), 0, "uc"), Sequence(ids(7), 0, "uc")]
    return MicroBatch(safe=safe, unsafe=unsafe, retain=retain, n_pairs=1)


def _states(model, seq: Sequence, lora: bool):
    """Hidden states [n_layers + 1, T, D] and logits [T, V] of one sequence alone, in float64."""
    x = torch.tensor([seq.input_ids])
    if lora:
        out = model(input_ids=x, output_hidden_states=True)
    else:
        model.eval()
        with torch.no_grad(), model.disable_adapter():
            out = model(input_ids=x, output_hidden_states=True)
        model.train()
    return torch.stack(out.hidden_states)[:, 0].double(), out.logits[0].double()


def float64_terms(model, micro: MicroBatch, cfg: LossConfig) -> dict[str, torch.Tensor]:
    U = list(cfg.target_layers)
    S = list(range(N_LAYERS + 1))  # alpha_mode all
    T = cfg.temperature

    def mean_l2(seqs, layers):
        total, count = 0.0, 0
        for s in seqs:  # response_all: tokens [request_len, len)
            h, _ = _states(model, s, lora=True)
            r, _ = _states(model, s, lora=False)
            d = (h[layers, s.request_len:] - r[layers, s.request_len:]).pow(2).sum(-1).sqrt()
            total, count = total + d.sum(), count + d.shape[1]
        return total / (len(layers) * count)

    last = torch.stack([_states(model, s, True)[0][U, s.request_len - 1] for s in micro.unsafe], dim=1)
    u = last / last.norm(dim=-1, keepdim=True)  # [|U|, N, D]
    n = u.shape[1]
    cos = u @ u.transpose(1, 2)
    l_cos = torch.stack([(1 - cos[k][~torch.eye(n, dtype=torch.bool)]).mean() for k in range(len(U))]).mean()

    kl = 0.0
    for s in micro.retain:
        _, z_lora = _states(model, s, True)
        _, z = _states(model, s, False)
        p = torch.softmax(z / T, -1)
        kl = kl + (p * (torch.log_softmax(z / T, -1) - torch.log_softmax(z_lora / T, -1))).sum() * T * T
    kl = kl / len(micro.retain)

    harmful, refusal = micro.unsafe[-1], micro.safe[-1]
    R = min(cfg.paired_repr_length, harmful.response_len, refusal.response_len)
    p0 = harmful.request_len - 1
    h, _ = _states(model, harmful, True)
    r, _ = _states(model, refusal, False)
    pair = (h[U, p0:p0 + R] - r[U, p0:p0 + R]).pow(2).sum(-1).sqrt().mean()

    terms = {"safe": mean_l2(micro.safe, S), "unsafe": mean_l2(micro.unsafe, U), "cos": l_cos, "kl": kl,
             "pair": pair}
    terms["total"] = (cfg.alpha * terms["safe"] - cfg.beta * terms["unsafe"] + cfg.gamma * terms["cos"]
                      + cfg.epsilon * terms["kl"] + cfg.eta * terms["pair"])
    return terms


def test_documented_calling_sequence_against_float64():
    model, tok = _model()
    micro = _micro(len(tok))
    # --- the README's calling sequence
    cfg = LossConfig(mode="response_all", alpha=0.5, beta=0.5, gamma=0.1, epsilon=0.3, eta=0.4,
                     alpha_mode="all", target_layers="1-3", temperature=2.0)
    loss_fn = RepBendLoss(cfg)
    params = loss_fn.prepare(model)
    batch = loss_fn.collate(micro, pad_id=0)
    terms = loss_fn(model, batch)
    terms.total.backward()
    # ---
    assert isinstance(loss_fn, torch.nn.Module) and not list(loss_fn.parameters())  # holds no model
    assert set(terms.parts) == {"safe", "unsafe", "cos", "kl", "pair"} == set(loss_fn.terms)
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    got_grads = [p.grad.double().clone() for p in params]

    for p in params:
        p.grad = None
    want = float64_terms(model, micro, cfg)
    want["total"].backward()
    for k in loss_fn.terms:
        torch.testing.assert_close(terms.parts[k].double(), want[k], rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(terms.total.double(), want["total"], rtol=1e-4, atol=1e-7)
    assert any(p.grad.abs().max() > 0 for p in params)
    for got, p in zip(got_grads, params):
        torch.testing.assert_close(got, p.grad.double(), rtol=1e-4, atol=1e-4 * float(p.grad.abs().max()) + 1e-10)

    packed = loss_fn(model, loss_fn.collate(micro, pad_id=0, pack_length=32))  # the same with packed rows
    torch.testing.assert_close(packed.total.double(), want["total"], rtol=1e-4, atol=1e-7)


def test_keyword_settings_and_a_zero_weight_term():
    fn = RepBendLoss(target_layers="2-3", eta=0.0)
    assert fn.cfg.target_layers == [2, 3] and fn.terms == ("safe", "unsafe", "cos", "kl", "pair")
    model, tok = _model()
    terms = fn(model, fn.collate(_micro(len(tok)), pad_id=0))
    assert terms.parts["pair"] is None and all(terms.parts[k] is not None for k in ("safe", "unsafe", "cos", "kl"))


def test_repbend_loss_imports_no_data_cli_or_eval_code():
    code = ("import sys; from repbend.loss import RepBendLoss, LossConfig, Sequence, MicroBatch; "
            "RepBendLoss(LossConfig()); "
            "bad = sorted(m for m in sys.modules if m.startswith(('repbend.data', 'repbend.cli', 'repbend.eval', "
            "'repbend.trainer', 'repbend.demo', 'repbend.integrations'))); print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
