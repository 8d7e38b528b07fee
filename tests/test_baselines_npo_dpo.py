"""NPO and DPO through the public loss API, against float64 formulas written here from full-vocabulary logits of the
model's own forward (the reference code's computation): every term, the LoRA gradients, packed rows, and DPO's
hidden pad-valued tokens (the reference's attention_mask = ids != pad; tests/test_attention_layouts.py checks every
backend).

pad = the <|eot_id|> of the test tokenizer here (the reference's pad = EOS): every request holds one, and the retain
chats one per turn."""
import pytest
import torch
import torch.nn.functional as F

from repbend.demo.assets import build_tiny_model, build_tokenizer
from repbend.loss import LossConfig, MicroBatch, RepBendLoss, Sequence
from repbend.model import LoraSettings, attach_lora

N_LAYERS = 3


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _model(tok, attn="sdpa", dropout=0.0):
    base = build_tiny_model(tok, seed=7, layers=N_LAYERS, hidden=32, heads=2, kv_heads=1)
    model = attach_lora(base, LoraSettings(r=4, alpha=8, dropout=dropout), layers_to_transform=range(N_LAYERS))
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():  # LoRA's B starts at 0 (the passes agree); move it so that every term has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.base_model.model.config._attn_implementation = attn
    return model.train()


def _rows(tok, seed=9):
    """Chat-template rows: (request ids, response ids) one-shot rows, and retain chats; pad = <|eot_id|>."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: tuple(torch.randint(10, len(tok), (n,), generator=g).tolist())  # noqa: E731

    def one_shot(n_req, n_resp):
        request = tuple(tok.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
        request = request[:-5] + words(n_req) + request[-5:]  # the user text before <|eot_id|> and the header
        return Sequence(request + words(n_resp), len(request), "one-shot")

    def chat(n_turns):
        eot = tok.convert_tokens_to_ids("<|eot_id|>")
        ids = (tok.bos_token_id,)
        for _ in range(n_turns):
            ids += words(int(torch.randint(3, 7, (1,), generator=g))) + (eot,)
        return Sequence(ids, 0, "chat")
    return one_shot, chat


def _logits(model, seq, lora, attention_mask=None):
    """Full logits [T, V] of one sequence alone, in float64 (adapters on: train mode; off: eval, no_grad)."""
    x = torch.tensor([seq.input_ids])
    mask = None if attention_mask is None else torch.tensor([attention_mask], dtype=torch.long)
    if lora:
        return model(input_ids=x, attention_mask=mask).logits[0].double()
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        out = model(input_ids=x, attention_mask=mask).logits[0].double()
    model.train()
    return out


def _lp(logits, ids):
    """lp(t) = log_softmax(z_{t-1})[x_t] for t = 1 .. T-1 (index t-1 of the result)."""
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


# ---------------------------------------------------------------- NPO
def npo_float64(model, micro, cfg, pad):
    beta, T = cfg.npo_beta, cfg.temperature
    npo = []
    for s in micro.unsafe:
        nll = [-_lp(_logits(model, s, lora), s.input_ids)[s.request_len - 1:].sum() for lora in (True, False)]
        npo.append(-(2 / beta) * F.logsigmoid(beta * (nll[0] - nll[1])))
    ce, n_ce, kl, n_kl = 0.0, 0, 0.0, 0
    for s in micro.safe + micro.retain:
        z1, z0 = _logits(model, s, True), _logits(model, s, False)
        lp = _lp(z1, s.input_ids)
        ids = s.input_ids
        if s.request_len:  # a one-shot row: the response
            ce_t = kl_t = list(range(s.request_len, len(s)))
        else:  # a retain chat: every token that is not pad (the KL at t = 0 too: unshifted)
            ce_t = [t for t in range(1, len(s)) if ids[t] != pad]
            kl_t = [t for t in range(len(s)) if ids[t] != pad]
        ce, n_ce = ce - lp[[t - 1 for t in ce_t]].sum(), n_ce + len(ce_t)
        p = torch.softmax(z0[kl_t] / T, -1)
        kl = kl + (p * (torch.log_softmax(z0[kl_t] / T, -1) - torch.log_softmax(z1[kl_t] / T, -1))).sum() * T * T
        n_kl += len(kl_t)
    terms = {"npo": torch.stack(npo).mean(), "ce": ce / n_ce, "kl": kl / n_kl}
    terms["total"] = cfg.npo_alpha * terms["ce"] + terms["npo"] + cfg.npo_gamma * terms["kl"]
    return terms


def _npo_micro(tok):
    one_shot, chat = _rows(tok)
    return MicroBatch(safe=[one_shot(3, 6), one_shot(5, 4)], unsafe=[one_shot(2, 7), one_shot(4, 5), one_shot(6, 3)],
                      retain=[chat(2), chat(3)])


def _check(got, want, params, grads):
    for k, v in got.parts.items():
        torch.testing.assert_close(v.double(), want[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(got.total.double(), want["total"], rtol=1e-4, atol=1e-6)
    for p in params:
        p.grad = None
    want["total"].backward()
    assert any(p.grad.abs().max() > 0 for p in params)
    for g, p in zip(grads, params):
        torch.testing.assert_close(g.double(), p.grad.double(), rtol=1e-4, atol=1e-4 * float(p.grad.abs().max()))


@pytest.mark.parametrize("pack", [None, 40])
def test_npo_against_float64(tok, pack):
    model, micro = _model(tok), _npo_micro(tok)
    pad = tok.convert_tokens_to_ids("<|eot_id|>")
    cfg = LossConfig(method="npo", npo_beta=0.1, npo_alpha=1.0, npo_gamma=0.1, temperature=2.0)
    fn = RepBendLoss(cfg)
    params = fn.prepare(model)
    batch = fn.collate(micro, pad_id=pad, pack_length=pack)
    assert batch.rows.packed == (pack is not None)
    terms = fn(model, batch)
    assert set(terms.parts) == {"npo", "ce", "kl"} == set(fn.terms)
    grads = torch.autograd.grad(terms.total, params)
    _check(terms, npo_float64(model, micro, cfg, pad), params, grads)


def test_npo_at_lora_zero_and_skipped_terms(tok):
    model, micro = _model(tok), _npo_micro(tok)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    fn = RepBendLoss(method="npo", npo_beta=0.1, npo_gamma=0.0)
    terms = fn(model, fn.collate(micro, pad_id=0))
    torch.testing.assert_close(terms.parts["npo"], torch.tensor(2 * torch.log(torch.tensor(2.0)).item() / 0.1))
    assert terms.parts["kl"] is None and terms.parts["ce"] is not None  # a weight <= 0 skips its term


def test_npo_recipe_and_a_run(tmp_path):
    from repbend import RepBendConfig, train
    from repbend.demo import corpus, save_tiny_model_dir, write_demo_data

    from repbend.recipes import resolve
    cfg = RepBendConfig.load(resolve("llama3_8b_npo"))
    assert cfg.loss.method == "npo" and (cfg.loss.npo_beta, cfg.loss.npo_alpha, cfg.loss.npo_gamma,
                                         cfg.loss.temperature) == (0.1, 1.0, 0.1, 2.0)
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum) == (5e-5, 1000, 4, 4)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.layers_to_transform) == (16, 16, 0.05, None)
    model_dir = save_tiny_model_dir(tmp_path / "m", corpus=corpus(), layers=2, hidden=32, heads=2, kv_heads=1)
    paths = write_demo_data(tmp_path / "d", seed=0, n_train=16, n_heldout=4)
    run = RepBendConfig.load(None, [
        "--loss.method", "npo", "--model.path", model_dir, "--data.wildguardmix", paths["wildguardmix"],
        "--data.wildjailbreak", paths["wildjailbreak"], "--data.ultrachat", paths["ultrachat"],
        "--train.output_dir", str(tmp_path / "run"), "--train.max_steps", "2", "--train.batch_size", "2",
        "--train.grad_accum", "1", "--lora.r", "2", "--train.progress", "false", "--data.max_response_tokens", "24",
        "--data.max_retain_tokens", "48"])
    result = train(run)
    assert [r["step"] for r in result.history] == [1, 2]
    first = result.history[0]
    assert abs(first["npo"] - 2 * 0.6931471805599453 / 0.1) < 1e-3  # LoRA B = 0 at the first step: 2 ln 2 / beta
    assert first["kl"] == 0.0 and first["ce"] > 0 and (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
# ---------------------------------------------------------------- DPO
def dpo_float64(model, micro, beta, pad):
    def logp(s, lora):  # the reference's forward: attention_mask = ids != pad, positions from 0 (hidden ones kept)
        mask = [int(t != pad) for t in s.input_ids]
        lp = _lp(_logits(model, s, lora, mask), s.input_ids)
        return sum(lp[t - 1] for t in range(s.request_len, len(s)) if s.input_ids[t] != pad)
    P = micro.n_pairs
    chosen, rejected = micro.safe[-P:], micro.unsafe[-P:]
    losses = []
    for c, r in zip(chosen, rejected):
        margin = (logp(c, True) - logp(r, True)) - (logp(c, False) - logp(r, False))
        losses.append(-F.logsigmoid(beta * margin))
    total = torch.stack(losses).mean()
    return {"dpo": total, "total": total}


def _dpo_micro(tok):
    one_shot, _ = _rows(tok, seed=3)
    chosen = [one_shot(3, 5), one_shot(6, 4), one_shot(2, 8)]
    rejected = [Sequence(c.input_ids[:c.request_len] + tuple(torch.randint(10, 400, (k,)).tolist()), c.request_len,
                         "rejected") for c, k in zip(chosen, (7, 3, 6))]
    return MicroBatch(safe=chosen, unsafe=rejected, retain=[], n_pairs=3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pack", [None, 48])
def test_dpo_against_float64_with_hidden_pad_tokens(tok, attn, pack):
    model, micro = _model(tok, attn), _dpo_micro(tok)
    pad = tok.convert_tokens_to_ids("<|eot_id|>")
    assert all(pad in s.input_ids[:s.request_len] for s in micro.safe)  # every request holds a hidden token
    fn = RepBendLoss(LossConfig(method="dpo", dpo_beta=0.1))
    params = fn.prepare(model)
    batch = fn.collate(micro, pad_id=pad, pack_length=pack)
    assert batch.rows.hidden is not None and batch.rows.packed == (pack is not None)
    terms = fn(model, batch)
    grads = torch.autograd.grad(terms.total, params)
    _check(terms, dpo_float64(model, micro, 0.1, pad), params, grads)


def test_dpo_at_lora_zero_is_ln2(tok):
    model, micro = _model(tok), _dpo_micro(tok)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    fn = RepBendLoss(method="dpo")
    terms = fn(model, fn.collate(micro, pad_id=0))
    torch.testing.assert_close(terms.total, torch.log(torch.tensor(2.0)))


def test_dpo_recipe_and_a_run(tmp_path):
    from repbend import RepBendConfig, train
    from repbend.demo import corpus, save_tiny_model_dir, write_demo_data
    from repbend.recipes import resolve

    cfg = RepBendConfig.load(resolve("llama3_8b_dpo"))
    assert cfg.loss.method == "dpo" and cfg.loss.dpo_beta == 0.1
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum) == (5e-5, 1250, 16, 1)
    model_dir = save_tiny_model_dir(tmp_path / "m", corpus=corpus(), layers=2, hidden=32, heads=2, kv_heads=1)
    paths = write_demo_data(tmp_path / "d", seed=0, n_train=16, n_heldout=4)
    run = RepBendConfig.load(None, [
        "--loss.method", "dpo", "--model.path", model_dir, "--data.wildjailbreak", paths["wildjailbreak"],
        "--train.output_dir", str(tmp_path / "run"), "--train.max_steps", "2", "--train.batch_size", "2",
        "--train.grad_accum", "1", "--lora.r", "2", "--train.progress", "false", "--data.max_response_tokens", "24"])
    result = train(run)
    assert [r["step"] for r in result.history] == [1, 2]
    assert abs(result.history[0]["dpo"] - 0.6931471805599453) < 1e-5  # ln 2 at LoRA B = 0
