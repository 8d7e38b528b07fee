"""Circuit Breakers / RMU data: the pools of the three sources (template markup, seeded empty instructions, the
uncapped forget rows, UltraChat's two-message rule), the sampler's forget / retain-side composition, the checks
before step 1, and the shipped recipes. Harmful content stays abstract ("harmful request #3")."""
import json

import pytest

from repbend import RepBendConfig
from repbend.build import check_data, make_sampler
from repbend.data import MicroBatchSampler, build_pools, render_request_response
from repbend.data.chat import Limits
from repbend.data.pools import empty_request_draw
from repbend.demo.assets import build_tokenizer
from repbend.errors import TrainingError
from repbend.loss import LossConfig, RepBendLoss


def _loss(method):
    return RepBendLoss(LossConfig(method=method))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(template="llama3")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("baseline_data")
    wgm = []
    for i in range(30):
        wgm.append({"prompt": f"benign request #{i}", "response": f"benign answer #{i}", "prompt_harm_label":
                    "unharmful", "response_refusal_label": "compliance", "response_harm_label": "unharmful"})
        wgm.append({"prompt": f"harmful request #{i}", "response": f"harmful answer #{i}", "prompt_harm_label":
                    "harmful", "response_refusal_label": "compliance", "response_harm_label": "harmful"})
    wj = [{"prompt": f"jailbreak request #{i}", "prompt_type": "harmful", "harmless_answer": f"refusal #{i}",
           "harmful_answer": f"harmful answer #{i}"} for i in range(25)]
    uc = [{"messages": [{"role": "user", "content": f"question #{i}"}, {"role": "assistant", "content": f"reply #{i}"},
                        {"role": "user", "content": f"follow-up #{i}"}, {"role": "assistant", "content": f"more #{i}"}]}
          for i in range(20)]
    uc += [{"messages": [{"role": "user", "content": f"lonely question #{i}"}]} for i in range(3)]
    return {"wildguardmix": _jsonl(d / "wgm.jsonl", wgm), "wildjailbreak": _jsonl(d / "wj.jsonl", wj),
            "ultrachat": _jsonl(d / "uc.jsonl", uc)}


def _pools(tok, files, method="circuit_breakers", p=0.5, seed=3, cap=12, limits=None):
    return build_pools(tok, files["wildguardmix"], files["wildjailbreak"], files["ultrachat"],
                       spec=_loss(method).data_spec(p), seed=seed, max_examples_per_pool=cap, limits=limits)


def _empty_request(tok):
    s = render_request_response(tok, "", "x", Limits(), "t", response_markup=True)
    return s.input_ids[:s.request_len]


def _is_empty(tok, s):
    return s.input_ids[:s.request_len] == _empty_request(tok)


def test_pools_render_markup_and_the_seeded_empty_instructions(tok, files):
    pools = _pools(tok, files)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    refusals, harmful = [r for r, _ in pools.pair], [h for _, h in pools.pair]
    # the cap applies to every pool but the forget rows of WildGuardMix
    assert (len(pools.safe), len(pools.unsafe), len(pools.pair), len(pools.retain)) == (12, 30, 12, 12)
    for s in pools.safe + pools.unsafe + refusals + harmful + pools.retain:
        assert s.input_ids[-1] == eot, s.origin  # every assistant turn ends with the template's end-of-turn
    # which rows are empty is the seeded draw, per pool, in order
    for rows, pool in ((pools.safe, "safe"), (pools.unsafe, "unsafe"), (refusals, "pair"),
                       (pools.retain, "retain")):
        assert [_is_empty(tok, s) for s in rows] == empty_request_draw(len(rows), 0.5, 3, pool), pool
    assert not any(_is_empty(tok, s) for s in harmful)
    assert 0 < sum(_is_empty(tok, s) for s in pools.unsafe) < 30
    # an UltraChat row so drawn is the empty instruction and its first reply; the others the whole chat
    for s in pools.retain:
        text = tok.decode(s.input_ids)
        if _is_empty(tok, s):
            n = text.split("reply #")[1].split("<")[0]
            assert s == render_request_response(tok, "", f"reply #{n}", Limits(), s.origin, response_markup=True)
        else:
            assert s.request_len == 0 and "follow-up #" in text and "more #" in text
    rep = pools.report
    assert rep.spec.response_markup and rep.to_dict()["spec"]["empty_request_p"] == 0.5
    assert rep.sources["ultrachat"].left == {"fewer than 2 messages": 3}
    uc = rep.sources["ultrachat"]
    assert uc.rows_read == sum(uc.qualified.values()) + sum(uc.left.values()) + uc.skipped.total
    assert rep.sources["wildguardmix"].empty_request["unsafe"] == sum(_is_empty(tok, s) for s in pools.unsafe)
    assert "empty instruction" in rep.summary()


def test_the_draw_is_deterministic_and_follows_p(tok, files):
    a, b = _pools(tok, files, seed=3), _pools(tok, files, seed=3)
    assert (a.safe, a.unsafe, a.pair, a.retain) == (b.safe, b.unsafe, b.pair, b.retain)
    c = _pools(tok, files, seed=4)
    assert [_is_empty(tok, s) for s in c.unsafe] != [_is_empty(tok, s) for s in a.unsafe]
    assert empty_request_draw(5, 0.5, 3, "safe") == empty_request_draw(5, 0.5, 3, "safe")
    draws = empty_request_draw(20_000, 0.3, 0, "retain")
    assert abs(sum(draws) / len(draws) - 0.3) < 0.02
    none, every = _pools(tok, files, p=0.0), _pools(tok, files, p=1.0)
    assert not any(_is_empty(tok, s) for s in none.safe + none.unsafe + none.retain)
    assert all(_is_empty(tok, s) for s in every.safe + every.unsafe + [r for r, _ in every.pair])
    assert not any(_is_empty(tok, h) for _, h in every.pair)


def test_the_sampler_draws_b_forget_and_b_retain_side_rows(tok, files):
    pools, B = _pools(tok, files, method="rmu"), 4
    s = MicroBatchSampler(pools, B, seed=0, method=_loss("rmu"))
    assert s.rows_per_batch == {"forget": B, "retain_side": B}
    forget = {x.input_ids for x in pools.unsafe + [h for _, h in pools.pair]}
    safe_side = {x.input_ids for x in pools.safe + [r for r, _ in pools.pair]}
    uc = {x.input_ids for x in pools.retain}
    seen = set()
    for i in range(30):
        mb = s(i)
        assert len(mb.unsafe) == B and len(mb.safe) + len(mb.retain) == B and mb.n_pairs == 0
        assert all(x.input_ids in forget for x in mb.unsafe)
        assert all(x.input_ids in safe_side for x in mb.safe) and all(x.input_ids in uc for x in mb.retain)
        seen.add((len(mb.safe), len(mb.retain)))
        assert [x.origin for x in MicroBatchSampler(pools, B, seed=0, method=_loss("rmu"))(i).unsafe] == \
            [x.origin for x in mb.unsafe]
    assert len(seen) > 1  # the split between the two retain-side sets varies: only their total is fixed
    with pytest.raises(ValueError, match="but method repbend reads"):
        MicroBatchSampler(pools, B, seed=0)


def _config(files, method, *extra):
    return RepBendConfig.load(None, ["--loss.method", method, "--data.wildguardmix", files["wildguardmix"],
                                     "--train.batch_size", "2", *extra])


def test_checks_before_step_one(tok, files):
    pools = _pools(tok, files, limits=Limits(max_retain_tokens=1024))
    longest = max(pools.safe + [r for r, _ in pools.pair] + pools.retain, key=len)
    cfg = _config(files, "circuit_breakers", "--loss.cb_retain_pad_length", str(len(longest) - 1))
    with pytest.raises(TrainingError, match=f"{longest.origin}.*cb_retain_pad_length"):
        check_data(cfg, pools, RepBendLoss(cfg.loss))
    cfg = _config(files, "circuit_breakers", "--loss.cb_retain_pad_length", str(len(longest)))
    check_data(cfg, pools, RepBendLoss(cfg.loss))
    only_safe = build_pools(tok, None, None, files["ultrachat"], spec=_loss("rmu").data_spec())
    cfg = _config(files, "rmu")
    with pytest.raises(TrainingError, match="forget rows"):
        check_data(cfg, only_safe, RepBendLoss(cfg.loss))
    sampler = make_sampler(cfg, _pools(tok, files, method="rmu"), RepBendLoss(cfg.loss))
    assert sampler.method.NAME == "rmu"
    cfg = _config(files, "rmu", "--train.batch_size", "100")
    with pytest.raises(TrainingError, match="forget"):
        make_sampler(cfg, _pools(tok, files, method="rmu"), RepBendLoss(cfg.loss))


def test_the_shipped_recipes():
    cb = RepBendConfig.load("repbend/configs/llama3_8b_circuit_breakers.yaml")
    assert cb.loss.method == "circuit_breakers"
    assert cb.loss.target_layers == [18, 29] + list(range(20, 31))  # the published list, 29 twice and no 19
    assert (cb.loss.retain_layers, cb.loss.cb_alpha, cb.loss.cb_progress_scale, cb.loss.cb_retain_pad_length) == \
        ("all", 10.0, 0.5, 2048)
    assert (cb.lora.r, cb.lora.alpha, cb.lora.dropout, cb.lora.layers_to_transform) == (16, 16, 0.05, None)
    assert (cb.train.lr, cb.train.max_steps, cb.train.batch_size, cb.train.grad_accum, cb.train.seed) == \
        (1e-4, 150, 4, 4, 42)
    assert (cb.data.max_request_tokens, cb.data.max_response_tokens, cb.data.max_retain_tokens,
            cb.data.empty_request_p) == (1024, 1024, 2048, 0.5)
    rmu = RepBendConfig.load("repbend/configs/llama3_8b_rmu.yaml")
    assert rmu.loss.method == "rmu"
    assert (rmu.loss.rmu_layer, rmu.loss.rmu_update_layers, rmu.loss.rmu_trainable, rmu.loss.rmu_alpha,
            rmu.loss.steering_coeff, rmu.loss.rmu_seed) == (7, [5, 6, 7], ["mlp.down_proj.weight"], 1200.0, 6.5, 42)
    assert (rmu.train.lr, rmu.train.max_steps, rmu.train.batch_size, rmu.train.grad_accum) == (5e-5, 150, 16, 1)
    assert (rmu.data.max_request_tokens, rmu.data.max_response_tokens, rmu.data.max_retain_tokens) == \
        (2048, 2048, 4096)
    for cfg in (cb, rmu):
        assert (cfg.train.weight_decay, cfg.train.schedule, cfg.train.warmup_steps, cfg.train.max_grad_norm) == \
            (0.0, "constant", 0, 1.0)
