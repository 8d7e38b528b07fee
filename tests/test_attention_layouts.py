"""Packed rows are exact on every attention backend: the loss and the LoRA gradients of a packed micro-batch equal
those of one row per sequence (fp32, rtol 1e-5), with a row that holds sequences of all three sets.

sdpa, eager and flex_attention run here. flash-attn cannot run on a CPU, so a recording attention function is
registered under a name with "flash" in it (transformers' AttentionInterface): it receives exactly what the
flash_attention_2 backend would (one flattened row and the varlen arguments cu_seq_lens_q/k, max_length_q/k),
records them, and computes varlen attention per sequence with sdpa. The real flash-attn runs in the GPU check.
flex_attention has no backward on a CPU: there the test compares the loss terms only (the GPU check compares
gradients too). LoRA dropout is 0 here: with dropout, the masks depend on the layout (same distribution, other
draws).
"""
import pytest
import torch
import torch.nn.functional as F

from repbend.demo.assets import build_tiny_model, build_tokenizer
from repbend.loss import LossConfig, MicroBatch, RepBendLoss, Sequence
from repbend.loss.layout import attention_inputs, lay_out, layout_kind
from repbend.model import LoraSettings, attach_lora

FLASH_NAME = "recording_flash_varlen"
CALLS: list[dict] = []


def recording_flash(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attn's varlen contract on one packed row: query [1, H, N, d]; returns [1, N, H, d]."""
    assert attention_mask is None, "a varlen backend gets no mask"
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    CALLS.append({"shape": tuple(query.shape), "cu": None if cu is None else cu.tolist(), "max": longest,
                  "cu_k": None if kwargs.get("cu_seq_lens_k") is None else kwargs["cu_seq_lens_k"].tolist()})
    if cu is None:  # not packed: plain causal attention per row
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    assert query.shape[0] == 1, "varlen expects one flattened row"
    pieces = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        pieces.append(F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                     is_causal=True, scale=scaling, enable_gqa=True))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module", autouse=True)
def _register():
    from transformers import AttentionInterface
    AttentionInterface.register(FLASH_NAME, recording_flash)


def _micro(vocab: int, seed: int = 0) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: tuple(torch.randint(5, vocab, (n,), generator=g).tolist())  # noqa: E731
    wgm = lambda: Sequence(ids(int(torch.randint(4, 12, (1,), generator=g))) + ids(int(torch.randint(3, 9, (1,),  # noqa: E731
                           generator=g))), 0, "t")
    safe = [Sequence(s.input_ids, len(s) // 2, "wgm") for s in (wgm(), wgm())]
    unsafe = [Sequence(s.input_ids, len(s) // 2, "wgm") for s in (wgm(), wgm())]
    req = ids(6)
    safe.append(Sequence(req + ids(5), 6, "wj"))
    unsafe.append(Sequence(req + ids(7), 6, "wj"))
    retain = [Sequence(ids(int(torch.randint(8, 20, (1,), generator=g))), 0, "uc") for _ in range(2)]
    return MicroBatch(safe, unsafe, retain, n_pairs=1)


def _model(attn: str):
    tok = build_tokenizer()
    base = build_tiny_model(tok, seed=1, layers=3, hidden=32, heads=4, kv_heads=2)
    model = attach_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0), layers_to_transform=range(3))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # LoRA B starts at 0; give every term a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.base_model.model.config._attn_implementation = attn
    return model.train(), tok


def _loss_and_grads(model, batch, cfg, grads=True):
    with torch.set_grad_enabled(grads):
        terms = RepBendLoss(cfg, impl="torch")(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    return terms, (torch.autograd.grad(terms.total, params) if grads else [])


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention", FLASH_NAME])
def test_packed_equals_unpacked(attn):
    model, tok = _model(attn)
    micro = _micro(len(tok))
    cfg = LossConfig(target_layers="1-3", eta=0.5)  # every term: safe, unsafe, cos, kl, pair
    loss_fn = RepBendLoss(cfg)
    plain = loss_fn.collate(micro, tok.pad_token_id)
    packed = loss_fn.collate(micro, tok.pad_token_id, pack_length=48)
    n_safe, n_unsafe = len(micro.safe), len(micro.unsafe)
    kinds = [{("safe" if k < n_safe else "unsafe" if k < n_safe + n_unsafe else "retain")
              for k, p in enumerate(packed.rows.placements) if p.row == r} for r in range(packed.shape[0])]
    assert {"safe", "unsafe", "retain"} in kinds, kinds  # one row holds sequences of all three sets
    assert packed.rows.packed and not plain.rows.packed

    CALLS.clear()
    grads = not (attn == "flex_attention" and not torch.cuda.is_available())
    a, ga = _loss_and_grads(model, plain, cfg, grads)
    b, gb = _loss_and_grads(model, packed, cfg, grads)
    torch.testing.assert_close(b.total, a.total, rtol=1e-5, atol=1e-7)
    for k, v in a.parts.items():  # the KL of two close distributions carries ~1e-6 absolute rounding noise
        assert v is not None, k
        torch.testing.assert_close(b.parts[k], v, rtol=1e-5, atol=2e-6, msg=lambda m: f"{attn} term {k}: {m}")
    assert any(g.abs().max() > 0 for g in ga) or not grads
    for x, y in zip(ga, gb):  # rtol 1e-5 of each gradient tensor's scale (summation order differs per layout)
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()) + 1e-9)
    if attn == FLASH_NAME:
        packed_calls = [c for c in CALLS if c["cu"] is not None]
        assert packed_calls, "the varlen backend got no cu_seq_lens"
        R, T = packed.shape
        starts = sorted(p.row * T + p.start for p in packed.rows.placements)
        for c in packed_calls:
            assert c["shape"][0] == 1 and c["shape"][2] == R * T  # one flattened row
            assert c["cu"] == starts + [R * T] and c["cu_k"] == c["cu"]
            assert c["max"] == max(b - a for a, b in zip(c["cu"], c["cu"][1:]))


def test_layout_kinds_and_inputs():
    assert [layout_kind(n) for n in ("flash_attention_2", "kernels-community/flash-attn3", "flex_attention",
                                     "sdpa", "eager", None)] == ["varlen", "varlen", "flex", "sdpa", "eager", "sdpa"]
    seqs = [Sequence((1, 2, 3), 1), Sequence((4, 5), 1), Sequence((6, 7, 8, 9), 2)]
    rows = lay_out(seqs, pad_id=0, pack_length=6)
    # first-fit decreasing: [9-long... ] row 0 = seq 2 (4) + seq 1 (2); row 1 = seq 0 (3) + 3 padding
    assert rows.input_ids.tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]  # padding continues its sequence
    assert rows.doc_ids.tolist() == [[2, 2, 2, 2, 1, 1], [0, 0, 0, 0, 0, 0]]
    assert rows.cu_seqlens == [0, 4, 6, 12] and rows.packed
    sd = attention_inputs(rows, "sdpa", torch.float32)["attention_mask"]
    assert sd.shape == (2, 1, 6, 6) and sd.dtype == torch.bool
    assert sd[0, 0, 5].tolist() == [False, False, False, False, True, True]  # seq 1 sees itself only
    assert sd[1, 0, 5].tolist() == [True] * 6  # row 1: one sequence and its padding, causal
    ea = attention_inputs(rows, "eager", torch.float32)["attention_mask"]
    assert torch.equal(ea == 0, sd) and ea.min() == torch.finfo(torch.float32).min
    fl = attention_inputs(rows, "flash_attention_2", torch.float32)
    assert fl["input_ids"].shape == (1, 12) and fl["cu_seq_lens_q"].tolist() == [0, 4, 6, 12]
    assert fl["max_length_q"] == 6 and fl["cu_seq_lens_q"].dtype == torch.int32
    one = lay_out(seqs, pad_id=0)  # one row per sequence: plain causal attention, no mask
    assert not one.packed and attention_inputs(one, "sdpa", torch.float32)["attention_mask"] is None



def _dpo_micro(vocab: int, hide: int, seed: int = 3) -> MicroBatch:
    """Pairs whose requests hold one token `hide` (DPO hides every pad-valued token from attention)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: tuple(torch.randint(6, vocab, (n,), generator=g).tolist())  # noqa: E731
    chosen, rejected = [], []
    for n_req, a, b in ((5, 4, 7), (8, 6, 3), (3, 9, 5)):
        request = ids(n_req) + (hide,) + ids(2)
        chosen.append(Sequence(request + ids(a), len(request), "wj"))
        rejected.append(Sequence(request + ids(b), len(request), "wj"))
    return MicroBatch(chosen, rejected, [], n_pairs=3)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention", FLASH_NAME])
def test_dpo_hidden_tokens_packed_equals_unpacked(attn):
    # torch's CPU flex-attention template fails to compile once dynamo turns the sequence length dynamic (a second
    # shape): each shape compiles statically here (CUDA's template has no such problem; the GPU check runs it)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        _dpo_packed_equals_unpacked(attn)


def _dpo_packed_equals_unpacked(attn):
    model, tok = _model(attn)
    hide = 5
    micro = _dpo_micro(len(tok), hide)
    loss_fn = RepBendLoss(LossConfig(method="dpo"))
    plain = loss_fn.collate(micro, hide)
    packed = loss_fn.collate(micro, hide, pack_length=40)
    assert packed.rows.packed and not plain.rows.packed and plain.rows.hidden.sum() == 6
    grads = not (attn == "flex_attention" and not torch.cuda.is_available())
    CALLS.clear()
    a, ga = _loss_and_grads(model, plain, loss_fn.cfg, grads)
    calls = {"plain": list(CALLS)}
    CALLS.clear()
    b, gb = _loss_and_grads(model, packed, loss_fn.cfg, grads)
    calls["packed"] = list(CALLS)
    torch.testing.assert_close(b.total, a.total, rtol=1e-5, atol=1e-7)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()) + 1e-9)
    # the hidden token changes the result: without hiding it (another pad id) the loss differs
    with torch.no_grad():
        seen = loss_fn(model, loss_fn.collate(micro, 0))
    assert abs(float(seen.total) - float(a.total)) > 1e-6
    if attn == FLASH_NAME:  # the hidden tokens are left out of the flattened row, packed or not
        for kind, batch in (("plain", plain), ("packed", packed)):
            R, T = batch.shape
            assert calls[kind] and all(c["shape"][2] == R * T - 6 and c["cu"][-1] == R * T - 6 for c in calls[kind])
