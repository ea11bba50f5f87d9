"""model.py: parameter counts, prompt parity with plain T5, frozen weights, folding, errors.

    python -m pytest -q tests/test_model.py
"""
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import make_tiny
import model
import report
import tables
from ept import cli, outputs, runtime
from model import METHODS, FoldedPrompt, PromptedT5, build_prompt_module, count_trainable
from conftest import save_folded_prompt

# docs/paper.md, "Methods": the paper's Param column, reproduced exactly.
EXPECTED = {
    "t5-small": {"ft": 60_506_624, "ptuning": 793_088, "ptuning-lstm": 12_081_664, "resprompt": 416_656,
                 "pt": 5_120, "ept": 1_536, "ept_star": 1_536},
    "t5-base": {"ft": 222_903_552, "ptuning": 1_779_456, "ptuning-lstm": 27_166_464, "resprompt": 624_784,
                "pt": 7_680, "ept": 2_304, "ept_star": 2_304},
    "t5-large": {"ft": 737_668_096, "ptuning": 3_159_040, "ptuning-lstm": 48_280_576, "resprompt": 832_912,
                 "pt": 10_240, "ept": 3_072, "ept_star": 3_072},
}
TINY = T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=2, num_decoder_layers=2,
                relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(TINY)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY.vocab_size, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[2, 4:], mask[2, 4:] = 0, 0  # one padded row
    labels = torch.randint(3, TINY.vocab_size, (3, 2), generator=g)
    return ids, mask, labels


def test_parameter_counts_match_the_paper(shared_dir):
    configs = shared_dir / "data" / "t5" if shared_dir else None  # T5Config with the same dims otherwise
    assert tables.parameter_table(configs) == EXPECTED


def test_parameter_counts_without_config_folders():
    assert tables.parameter_table(None) == EXPECTED


@pytest.mark.parametrize("method", METHODS[1:])
def test_prompt_shape_and_every_parameter_gets_a_gradient(method):
    m = PromptedT5(tiny_t5(), build_prompt_module(method, TINY.d_model))
    n = 1 if method == "ept" else 10
    assert m.prompt().shape == (n, TINY.d_model)
    ids, mask, labels = batch()
    m(ids, mask, labels=labels).loss.backward()
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in m.t5.parameters())


def test_parameters_registered_in_forward_order():
    enc = build_prompt_module("resprompt", TINY.d_model)
    assert [k for k, _ in enc.named_parameters()] == [
        "prompt", "down.weight", "down.bias", "up.weight", "up.bias", "norm.weight", "norm.bias"]
    enc = build_prompt_module("ept", TINY.d_model)
    assert [k for k, _ in enc.named_parameters()] == ["prompt", "blocks.0.down.weight", "blocks.0.up.weight"]


def test_prompt_equal_to_token_embeddings_matches_plain_t5():
    """Parity: P' = embeddings of real ids gives exactly plain T5 on [ids; input]."""
    t5 = tiny_t5().eval()
    prompt_ids = torch.tensor([5, 9, 11, 3])
    prompted = PromptedT5(t5, FoldedPrompt(t5.get_input_embeddings().weight[prompt_ids])).eval()
    ids, mask, labels = batch()
    full_ids = torch.cat([prompt_ids.expand(3, -1), ids], dim=1)
    full_mask = torch.cat([torch.ones(3, 4, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        ours = prompted(ids, mask, labels=labels)
        plain = t5(input_ids=full_ids, attention_mask=full_mask, labels=labels)
    torch.testing.assert_close(ours.logits, plain.logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.loss, plain.loss, rtol=0, atol=0)
    gen_ours = prompted.generate(ids, mask, max_new_tokens=4, do_sample=False)
    gen_plain = t5.generate(input_ids=full_ids, attention_mask=full_mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_ours, gen_plain)


def adamw_steps(m, steps=3):
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.3, weight_decay=0.01)
    ids, mask, labels = batch()
    for _ in range(steps):
        opt.zero_grad()
        m(ids, mask, labels=labels).loss.backward()
        opt.step()


@pytest.mark.parametrize("method", ["pt", "ptuning", "resprompt", "ept", "ept_star"])
def test_training_moves_only_the_prompt(method):
    m = PromptedT5(tiny_t5(), build_prompt_module(method, TINY.d_model))
    m.train()  # dropout active, as under the Trainer
    t5_before = {k: v.clone() for k, v in m.t5.state_dict().items()}
    prompt_before = {k: v.clone() for k, v in m.prompt_module.state_dict().items()}
    adamw_steps(m)
    assert all(torch.equal(t5_before[k], v) for k, v in m.t5.state_dict().items())
    assert all(not torch.equal(prompt_before[k], v) for k, v in m.prompt_module.state_dict().items()
               if not k.startswith("norm"))  # every weight moved (LayerNorm too, checked as a whole below)
    assert any(not torch.equal(prompt_before[k], v) for k, v in m.prompt_module.state_dict().items())


def test_full_fine_tuning_trains_t5():
    m = PromptedT5(tiny_t5(), None)
    assert m.prompt() is None and count_trainable(m) == count_trainable(m.t5) > 0
    before = {k: v.clone() for k, v in m.t5.state_dict().items()}
    adamw_steps(m)
    changed = [k for k, v in m.t5.state_dict().items() if not torch.equal(before[k], v)]
    assert "shared.weight" in changed and len(changed) > len(before) // 2


def test_ept_star_rows_identical_and_broadcast_length():
    p = build_prompt_module("ept_star", 8)()
    assert p.shape == (10, 8) and torch.equal(p, p[:1].expand(10, -1))
    assert build_prompt_module("ept", 8, broadcast=4)().shape == (4, 8)


def test_folded_prompt_reproduces_outputs_exactly(tmp_path):
    t5 = tiny_t5().eval()
    trained = PromptedT5(t5, build_prompt_module("resprompt", TINY.d_model)).eval()
    save_folded_prompt(tmp_path / "prompt.pt", trained.prompt(), {"method": "resprompt"})
    prompt, meta = outputs.load_folded_prompt(tmp_path / "prompt.pt")
    assert meta == {"method": "resprompt"} and prompt.dtype == torch.float32
    folded = PromptedT5(t5, FoldedPrompt(prompt)).eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(folded(ids, mask, labels=labels).logits,
                                   trained(ids, mask, labels=labels).logits, rtol=0, atol=0)
    assert torch.equal(folded.generate(ids, mask, max_new_tokens=3), trained.generate(ids, mask, max_new_tokens=3))


def test_trainable_state_roundtrip_is_bitwise(tmp_path):
    a = PromptedT5(tiny_t5(), build_prompt_module("ptuning", TINY.d_model, reparam="lstm"))
    torch.save(a.prompt_module.state_dict(), tmp_path / "s.pt")  # what best.pt's "trainable" holds
    b = PromptedT5(tiny_t5(), build_prompt_module("ptuning", TINY.d_model, reparam="lstm",
                                                   generator=torch.Generator().manual_seed(7)))
    b.trainable.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(a.prompt(), b.prompt())


@pytest.mark.parametrize("switches, extra", [
    ({}, 0), ({"layer_norm": True}, 2 * 16), ({"residual": True}, 0), ({"activation": "relu"}, 0),
    ({"activation": "sigmoid"}, 0), ({"depth": 2}, 2 * 16 * 1), ({"hidden_size": 5}, 2 * 16 * 4),
])
def test_ept_structure_switches_add_the_right_parameters(switches, extra):
    enc = build_prompt_module("ept", 16, **switches)
    assert count_trainable(enc) == 3 * 16 + extra
    if switches.get("residual"):  # P' = up(down(P1)) + P1
        blk = enc.blocks[0]
        torch.testing.assert_close(enc(), blk.up(blk.down(enc.prompt)) + enc.prompt)


def test_figure9_nonlinearities_are_relu_tanh_sigmoid():
    """Figure 9's three (the paper names ReLU and "three types"; the public EPT code has ReLU, Tanh, Sigmoid)."""
    assert set(model.ACTIVATIONS) == {"none", "relu", "tanh", "sigmoid"}
    for name, fn in (("relu", torch.relu), ("tanh", torch.tanh), ("sigmoid", torch.sigmoid)):
        enc = build_prompt_module("ept", 16, hidden_size=3, activation=name, generator=torch.Generator().manual_seed(0))
        blk = enc.blocks[0]
        torch.testing.assert_close(enc(), blk.up(fn(blk.down(enc.prompt))))
    assert isinstance(build_prompt_module("ept", 16, activation="sigmoid").blocks[0].act, torch.nn.Sigmoid)


def test_inits():
    emb = torch.randn(50, 8)
    g = torch.Generator().manual_seed(0)
    uni = build_prompt_module("pt", 8, generator=g).prompt
    assert uni.min() >= -0.5 and uni.max() <= 0.5 and uni.std() > 0.2
    vocab = build_prompt_module("pt", 8, init="vocab", embedding=emb).prompt
    assert all(any(torch.equal(row, e) for e in emb) for row in vocab)
    label = build_prompt_module("pt", 8, prompt_length=4, init="label", embedding=emb, label_ids=[3, 7]).prompt
    assert torch.equal(label, emb[[3, 7, 3, 7]])
    ept = build_prompt_module("ept", 8, init="label", embedding=emb, label_ids=[3, 7]).prompt
    torch.testing.assert_close(ept, emb[[3, 7]].mean(0, keepdim=True))


@pytest.mark.parametrize("kwargs, names", [
    ({"method": "lora"}, "ft, pt, ptuning, resprompt, ept, ept_star"),
    ({"method": "ptuning", "reparam": "gru"}, "mlp, lstm"),
    ({"method": "ept", "activation": "swish"}, "none, relu, tanh, sigmoid"),
    ({"method": "ept", "init": "zeros"}, "uniform, vocab, label"),
])
def test_unknown_method_or_option_lists_the_valid_ones(kwargs, names):
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=names):
        build_prompt_module(method, 8, **kwargs)


def test_vocab_init_without_embedding_is_a_clear_error():
    with pytest.raises(ValueError, match="embedding"):
        build_prompt_module("ept", 8, init="vocab")


def test_tiny_model_folder_loads(tiny_model_dir):
    t5, tok = runtime.load_t5(tiny_model_dir), runtime.load_tokenizer(tiny_model_dir)
    enc = tok(["sentence: a good movie"], return_tensors="pt")
    assert enc.input_ids[0, -1].item() == tok.eos_token_id == 1 and tok.pad_token_id == 0
    m = PromptedT5(t5, build_prompt_module("ept_star", t5.config.d_model))
    assert m.generate(enc.input_ids, enc.attention_mask, max_new_tokens=2).shape[0] == 1


def test_offline_tokenizer_when_no_real_one(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.tsv").write_text("the quick brown fox\tjumps over the lazy dog\n" * 20)
    out = make_tiny.make_tiny(tmp_path / "tiny", corpus_dir=tmp_path / "raw")
    tok = runtime.load_tokenizer(out)
    ids = tok("the lazy fox").input_ids
    assert ids[-1] == 1 and tok.decode(ids, skip_special_tokens=True) == "the lazy fox"


def test_config_folder_without_weights_says_random_init(tmp_path):
    TINY.save_pretrained(tmp_path)
    with pytest.raises(cli.Failure, match="--random-init"):
        runtime.load_t5(tmp_path)
    assert runtime.load_t5(tmp_path, random_init=True).config.d_model == 16


def test_unreachable_hub_is_one_sentence(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait in tests
    with pytest.raises(cli.Failure, match=r"^could not load the model .*; pass --model DIR"):
        runtime.load_t5("no-such-org/no-such-t5")


def test_count_cli(capsys):
    report.main(["--count"])
    out = capsys.readouterr().out
    assert "60,506,624" in out and "2,304" in out and "48,280,576" in out and "3,073" in out
    for argv, message in ((["--count", "--configs", "no-such-dir"], "no-such-dir is not a folder"),
                          (["--configs", "."], "--configs . goes with --count")):
        with pytest.raises(SystemExit, match=message):
            report.main(argv)


def test_config_only_folder_borrows_the_parent_tokenizer(tokenizer_dir):
    if tokenizer_dir is None:
        pytest.skip("needs ../shared/data/t5")
    tok = runtime.load_tokenizer(tokenizer_dir / "t5-small")  # config + tokenizer_config, no vocabulary
    assert len(tok) == 32100 and tok("hello world").input_ids == [21820, 296, 1]


def test_prompt_options_read_from_a_run_config():
    """A run's config.json rebuilds the same network; a key it lacks takes the option's default."""
    assert model.prompt_options({"method": "ptuning", "reparam": "lstm"})["reparam"] == "lstm"
    assert model.prompt_options({"method": "ept"})["extra_layer"] is False  # a key older runs lack: its default


@pytest.mark.parametrize("method,options", [("ept", {}), ("ept_star", {}), ("ptuning", {"reparam": "mlp"}),
                                            ("ptuning", {"reparam": "lstm"}), ("resprompt", {})])
def test_prompt_and_its_layers_are_drawn_independently(method, options):
    """Issue 27: the prompt table and the first layer once read the same seeded numbers
    (W_down = (2/sqrt(d)) P1 exactly, |cos| = 1). Independent draws in d = 64 give |cos| ~ 0.1."""
    from ept import pack
    config = T5Config(vocab_size=64, d_model=64, d_ff=32, d_kv=16, num_heads=4, num_layers=1,
                      num_decoder_layers=1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    for seed in range(4):
        module = pack.make_run(T5ForConditionalGeneration(config), method, seed=seed, max_steps=1,
                                   **options).module
        table = module.prompt.detach()
        first = {"ept": lambda: module.blocks[0].down.weight, "ept_star": lambda: module.blocks[0].down.weight,
                 "resprompt": lambda: module.down.weight}.get(
            method, lambda: module.mlp[0].weight if options["reparam"] == "mlp" else module.lstm.weight_ih_l0)()
        rows = first.detach()[:table.size(0)]
        cos = torch.nn.functional.cosine_similarity(table, rows, dim=1).abs()
        assert cos.max() < 0.6, (method, seed, cos.max().item())
        again = pack.make_run(T5ForConditionalGeneration(config), method, seed=seed, max_steps=1,
                                  **options).module
        assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), again.state_dict().values()))
