"""L_KL reads the model's own logits: for a model that soft-caps them (Gemma-2's final_logit_softcapping), the
fused term equals the KL computed from the model's forward output."""
import torch
import torch.nn.functional as F

from repbend.loss import LossConfig, MicroBatch, RepBendLoss, Sequence
from repbend.model import LoraSettings, attach_lora


def _gemma2(cap: float):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=cap,
                       attn_logit_softcapping=None, sliding_window=64, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # large logits, so that the cap matters
        model.lm_head.weight.mul_(40)
    model.config._attn_implementation = "eager"
    model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0), range(2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.train()


def test_kl_matches_the_soft_capped_logits():
    model = _gemma2(cap=5.0)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: tuple(torch.randint(1, 97, (n,), generator=g).tolist())  # noqa: E731
    retain = [Sequence(ids(9), 0), Sequence(ids(6), 0)]
    micro = MicroBatch([Sequence(ids(8), 4)], [Sequence(ids(7), 3)], retain)
    cfg = LossConfig(target_layers="1-2", alpha=0.0, beta=0.0, gamma=0.0, epsilon=1.0, temperature=2.0)
    fn = RepBendLoss(cfg, impl="torch")
    got = fn(model, fn.collate(micro, pad_id=0)).parts["kl"]

    T, want = cfg.temperature, 0.0
    for s in retain:
        x = torch.tensor([s.input_ids])
        with torch.no_grad(), model.disable_adapter():
            model.eval()
            z = model(x).logits.double()
        model.train()
        z_lora = model(x).logits.double()
        assert z.abs().max() <= 5.0 + 1e-9  # the model's own logits are capped
        want = want + F.kl_div(F.log_softmax(z_lora / T, -1), F.softmax(z / T, -1), reduction="sum") * T * T
    want = want / len(retain)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    uncapped = RepBendLoss(cfg, impl="torch")
    model.base_model.model.config.final_logit_softcapping = None
    assert abs(float(uncapped(model, fn.collate(micro, pad_id=0)).parts["kl"]) - float(want)) > 1e-3
