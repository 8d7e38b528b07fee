"""Inputs and settings that could only train nothing or compute the wrong thing are refused with one clear line:
the public loss API's `collate` / `forward` inputs (ValueError naming the row and field), and, before step 1 of a
run, settings under which no weighted term has a gradient at LoRA B = 0 or no trained tensor can change what a
weighted term reads."""
import pytest

from repbend import RepBendConfig, train
from repbend.demo.assets import build_tiny_model, build_tokenizer, save_tiny_model_dir
from repbend.demo.synthetic import corpus, write_demo_data
from repbend.errors import ConfigError, TrainingError
from repbend.loss import LossConfig, MicroBatch, RepBendLoss, Sequence
from repbend.model import LoraSettings, attach_lora


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _micro(unsafe_request_len=3):
    safe = [Sequence((1, 7, 8, 9, 10), 2, "s0"), Sequence((1, 7, 11, 12), 2, "s1")]
    unsafe = [Sequence((1, 9, 9, 13, 14), 3, "u0"), Sequence((1, 6, 6, 6, 15), unsafe_request_len, "u1")]
    return MicroBatch(safe=safe, unsafe=unsafe, retain=[Sequence((1, 20, 21, 22), 0, "r0")], n_pairs=0)


def test_collate_and_forward_name_what_is_wrong(tok):
    fn = RepBendLoss(LossConfig(target_layers="1-2"))
    with pytest.raises(ValueError, match=r"MicroBatch.unsafe\[1\] \(u1\): request_len 0, but L_cos reads"):
        fn.collate(_micro(unsafe_request_len=0), pad_id=0)
    with pytest.raises(ValueError, match="pad_id must be a token id .* tokenizer.eos_token_id"):
        fn.collate(_micro(), pad_id=None)
    with pytest.raises(ValueError, match=r"MicroBatch.safe\[0\] \(bad\): input_ids holds the negative id -3"):
        MicroBatch(safe=[Sequence((1, -3, 4), 1, "bad")], unsafe=[], retain=[])
    base = build_tiny_model(tok, seed=0, layers=2, hidden=16, heads=2, kv_heads=1)
    batch = fn.collate(_micro(), pad_id=0)
    with pytest.raises(ValueError, match="trains LoRA adapters: give it the PEFT model"):
        fn(base, batch)
    model = attach_lora(base, LoraSettings(r=2, alpha=4, dropout=0.0), layers_to_transform=[0, 1])
    big = MicroBatch(safe=_micro().safe, unsafe=[Sequence((1, 2, len(tok) + 5), 2, "u")] * 2, retain=[])
    with pytest.raises(ValueError, match=f"token id {len(tok) + 5}, past the model's vocabulary of {len(tok)}"):
        fn(model, fn.collate(big, pad_id=0))
    with pytest.raises(ValueError, match=r"repbend: the weighted term\(s\) kl have no tokens"):
        fn(model, fn.collate(MicroBatch(_micro().safe, _micro().unsafe, []), pad_id=0))
    terms = RepBendLoss(fn.cfg, allow_empty_terms=True)(model, fn.collate(MicroBatch(_micro().safe, _micro().unsafe,
                                                                                     []), pad_id=0))
    assert terms.parts["kl"] is None and terms.parts["cos"] is not None


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    paths = write_demo_data(root / "data", seed=0, n_train=24, n_heldout=4)
    model_dir = save_tiny_model_dir(root / "model", corpus=corpus(), layers=3, hidden=32, heads=2, kv_heads=1)
    return model_dir, paths


def _cfg(assets, out, *extra, data=("wildguardmix", "wildjailbreak", "ultrachat")):
    model_dir, paths = assets
    args = ["--model.path", model_dir, "--train.output_dir", str(out), "--train.max_steps", "2",
            "--train.batch_size", "2", "--train.grad_accum", "1", "--lora.r", "2", "--train.progress", "false",
            "--data.max_response_tokens", "24", "--data.max_retain_tokens", "48"]
    for name in data:
        args += [f"--data.{name}", paths[name]]
    return RepBendConfig.load(None, args + list(extra))


def test_settings_without_a_gradient_at_the_start_are_refused_before_step_1(assets, tmp_path):
    with pytest.raises(TrainingError, match="nothing would ever train: .* loss.gamma = 0 and loss.eta = 0"):
        train(_cfg(assets, tmp_path / "a", "--loss.gamma", "0"))
    # WildJailbreak alone at batch_size 1: one unsafe row, so L_cos compares nothing, and eta is 0
    with pytest.raises(TrainingError, match="L_cos compares at least two unsafe rows and a micro-batch has 1"):
        train(_cfg(assets, tmp_path / "b", "--train.batch_size", "1", "--loss.epsilon", "0",
                   data=("wildjailbreak",)))
    for out in ("a", "b"):
        assert not (tmp_path / out / "log.jsonl").exists() or not (tmp_path / out / "log.jsonl").read_text()


def test_layers_no_trained_tensor_changes_are_refused_naming_them(assets, tmp_path):
    # every weighted term reads index 0 (the embeddings), which no decoder layer changes
    with pytest.raises(ConfigError, match=r"lora.layers_to_transform: no weighted term reads a hidden state that a "
                                          r"trained layer changes: the trained decoder layers are \[0\]"):
        train(_cfg(assets, tmp_path / "a", "--loss.target_layers", "0", "--loss.alpha_mode", "target",
                   "--loss.epsilon", "0"))
    with pytest.raises(ConfigError, match=r"lora.layers_to_transform: .*are \[2\].*L_unsafe reads \[1, 2\]"):
        train(_cfg(assets, tmp_path / "b", "--loss.target_layers", "1-2", "--lora.layers_to_transform", "2",
                   "--loss.alpha_mode", "target", "--loss.epsilon", "0"))
    with pytest.raises(ConfigError, match=r"loss.rmu_update_layers: .*the trained decoder layers are \[1, 2\]"):
        train(_cfg(assets, tmp_path / "c", "--loss.method", "rmu", "--loss.rmu_layer", "1",
                   "--loss.rmu_update_layers", "1-2"))


def test_the_defaults_fit_a_small_model(assets, tmp_path):
    """No recipe: target layers and adapters at the model's own depth (here 3 decoder layers)."""
    result = train(_cfg(assets, tmp_path / "run"))
    assert result.steps == 2
    fn = RepBendLoss(LossConfig())
    assert fn.method.layer_sets(3)[1] == [1, 2] and fn.method.lora_layers(3) == [0, 1, 2]
    assert fn.method.layer_sets(32)[1] == list(range(20, 31))  # the published span at 32 layers
    assert fn.method.lora_layers(32) == list(range(31))  # the recipe: adapters on decoder layers 0-30
    cb = RepBendLoss(LossConfig(method="circuit_breakers")).method
    assert cb.layer_sets(32)[1] == [18, 29] + list(range(20, 31))
    rmu = RepBendLoss(LossConfig(method="rmu")).method
    assert rmu.layer_settings(32) == (7, [5, 6, 7]) and rmu.layer_settings(4) == (1, [0])
