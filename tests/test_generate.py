"""Sampling from CVFP and the baselines: seeded, stop tokens, the sequential scan, the command line."""

import pytest
import torch
from conftest import toy_documents
from helpers import tiny_model

import cvfp.baselines as baselines
import cvfp.generate as gen
from cvfp.cli import main as cli_main
from cvfp.data.corpus import BOUNDARY_TOKEN
from cvfp.data.tokenizer import decode, encode_prompt, save_tokenizer, special_token_ids, train_tokenizer
from cvfp.io import sha256_file
from cvfp.model import save_model
from cvfp.params import Params

UNSEEN = "日本語のテキスト Ω ∑ \U0001F680 ünïcödé"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(toy_documents(), vocab_size=300, min_frequency=2)


def cvfp_model(vocab, seed=0):
    model = tiny_model(seed, vocab_size=vocab, layer_structure=[1, 1])
    torch.nn.init.normal_(model.token_output.weight, 0.0, 0.5)  # sharper logits than the default init
    return model.eval()


def baseline(kind, vocab, seed=0):
    torch.manual_seed(seed)
    params = Params().baselines.model_copy(update={"seq_len": 8})
    return baselines.build(kind, baselines.baseline_args(kind, 8, vocab, params)).eval()


def generators(vocab):
    return {"cvfp": gen.CVFPGenerator(cvfp_model(vocab)), "gru": gen.BaselineGenerator(baseline("gru", vocab)),
            "transformer": gen.BaselineGenerator(baseline("transformer", vocab))}


@pytest.mark.parametrize("kind", gen.MODELS)
def test_deterministic_under_a_seed_and_stops_at_max_new_tokens(kind):
    def make():  # a fresh generator (fresh state) each time
        return generators(40)[kind]

    prompt = [0, 1, 5, 7, 9, 2]
    first = gen.generate(make(), prompt, max_new_tokens=12, temperature=1.0, top_k=0, seed=7)
    second = gen.generate(make(), prompt, max_new_tokens=12, temperature=1.0, top_k=0, seed=7)
    assert first == second and len(first) == 12  # seq_len 8 < prompt + 12: the Transformer window slides
    others = [gen.generate(make(), prompt, 12, 1.0, 0, seed) for seed in (8, 9, 10)]
    assert any(other != first for other in others)
    assert all(0 <= i < 40 for i in first)


@pytest.mark.parametrize("kind", gen.MODELS)
def test_stops_after_a_stop_token_and_greedy_is_argmax(kind):
    generator = generators(40)[kind]
    logits = generator.prefill([0, 1, 5])
    greedy = gen.generate(generators(40)[kind], [0, 1, 5], max_new_tokens=1, temperature=0)
    assert greedy == [int(logits.argmax())]
    stopped = gen.generate(generators(40)[kind], [0, 1, 5], max_new_tokens=50, temperature=0, stop_ids=greedy)
    assert stopped == greedy


def test_top_k_samples_only_among_the_k_best():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0, 3.0])
    rng = torch.Generator().manual_seed(0)
    drawn = {gen.sample(logits, 5.0, 2, rng) for _ in range(200)}
    assert drawn == {1, 2}


def test_cvfp_generation_is_the_sequential_scan():
    """Prefill (fast scan) then model.step per sampled token gives the logits of one scan over everything."""
    model = cvfp_model(40)
    generator = gen.CVFPGenerator(model)
    prompt = [0, 1, 5, 7, 9, 2]
    new = gen.generate(generator, prompt, max_new_tokens=6, temperature=1.0, seed=3)
    step_logits = generator.advance(new[-1])
    ids = torch.tensor(prompt + new)
    with torch.no_grad():
        contexts, token_outs = model.scan(model.embed(ids), with_token_out=True)
        scanned = model.logits(contexts[-1], token_outs[-1])
    torch.testing.assert_close(step_logits, scanned, rtol=1e-5, atol=1e-5)


def test_every_model_continues_a_prompt_of_unseen_characters(tokenizer):
    ids = encode_prompt(tokenizer, UNSEEN)  # the encoding itself: tests/test_tokenizer.py
    for kind, generator in generators(tokenizer.get_vocab_size()).items():
        new = gen.generate(generator, ids, max_new_tokens=5, temperature=0.8, top_k=10, seed=0)
        assert len(new) == 5, kind
        assert isinstance(decode(tokenizer, new), str)


def test_reply_is_the_decoded_continuation_of_the_prompt_turn(tokenizer):
    """`reply` (the command line's and the compare stage's) = decode(generate(encode_prompt(text))), stopping at
    <|endoftext|> unless told otherwise."""
    def fresh():
        return gen.CVFPGenerator(cvfp_model(tokenizer.get_vocab_size()))

    prompt = encode_prompt(tokenizer, "hello there")
    stopped = gen.generate(fresh(), prompt, 20, 1.0, 0, 5, (special_token_ids(tokenizer)[BOUNDARY_TOKEN],))
    assert gen.reply(fresh(), tokenizer, "hello there", 20, 1.0, 0, 5) == decode(tokenizer, stopped)
    free = gen.generate(fresh(), prompt, 20, 1.0, 0, 5)
    unstopped = gen.reply(fresh(), tokenizer, "hello there", 20, 1.0, 0, 5, stop_at_boundary=False)
    assert unstopped == decode(tokenizer, free)


@pytest.fixture
def trained(tmp_path, tokenizer):
    """Checkpoints of all three models and a tokenizer.json, laid out like the pipeline's."""
    vocab = tokenizer.get_vocab_size()
    tokenizer_path = tmp_path / "tokenizer.json"
    save_tokenizer(tokenizer, tokenizer_path)
    digest = sha256_file(tokenizer_path)
    save_model(tmp_path / "phase2.pt", cvfp_model(vocab), tokenizer_sha256=digest, context_mode="stability")
    for kind in baselines.KINDS:
        baselines.save_baseline(tmp_path / f"{kind}.pt", kind, baseline(kind, vocab), tokenizer_sha256=digest)
    return tmp_path


@pytest.mark.parametrize("kind", gen.MODELS)
def test_cli_generates_deterministically(trained, capsys, kind):
    checkpoint = trained / ("phase2.pt" if kind == "cvfp" else f"{kind}.pt")
    argv = ["generate", "--prompt", f"hello there {UNSEEN}", "--model", kind, "--max-new-tokens", "7", "--seed", "4",
            "--temperature", "1.0", "--top-k", "20", "--checkpoint", str(checkpoint),
            "--tokenizer", str(trained / "tokenizer.json")]
    outputs = []
    for _ in range(2):
        with pytest.raises(SystemExit) as done:
            cli_main(argv)
        assert done.value.code == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_cli_refuses_a_checkpoint_of_another_tokenizer(trained, tokenizer, capsys):
    other = train_tokenizer(toy_documents()[:6], vocab_size=290, min_frequency=2)
    save_tokenizer(other, trained / "other.json")
    with pytest.raises(SystemExit) as done:
        gen.main(["--prompt", "hi", "--model", "gru", "--checkpoint", str(trained / "gru.pt"),
                  "--tokenizer", str(trained / "other.json")])
    assert done.value.code == 2
    assert "stale" in capsys.readouterr().err
