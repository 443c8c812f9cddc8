"""Built-in task, character tokenizer, prompt format and tiny model of lpreg.trainer."""

import json
import re

import pytest
import torch

from lpreg.trainer.model import (
    build_tiny_model,
    format_prompt,
    generate_completions,
    load_policy,
    warm_start,
)
from lpreg.trainer.tasks import arithmetic_problems, split_size
from lpreg.trainer.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def test_problems_are_deterministic_and_correct():
    a = arithmetic_problems(200, seed=3)
    assert a == arithmetic_problems(200, seed=3)
    assert a != arithmetic_problems(200, seed=4)
    assert len({p.question for p in a}) == 200  # drawn without replacement
    for p in a:
        x, op, y = re.fullmatch(r"(\d+)([+-])(\d+)=\?", p.question).groups()
        assert int(p.answer) == (int(x) + int(y) if op == "+" else int(x) - int(y))
        assert 0 <= int(x) <= 99 and 0 <= int(y) <= 99


def test_splits_are_disjoint_and_cover_the_universe():
    train = arithmetic_problems(split_size("train"), seed=0, split="train")
    test = arithmetic_problems(split_size("test"), seed=0, split="test")
    assert not {p.question for p in train} & {p.question for p in test}
    assert len(train) + len(test) == 2 * 100 * 100
    assert 0.08 < len(test) / (len(train) + len(test)) < 0.12
    # Same test problems whatever the seed: the split does not depend on it.
    assert {p.question for p in arithmetic_problems(50, seed=9, split="test")} <= {p.question for p in test}


def test_max_operand_restricts_and_keeps_splits():
    small_test = arithmetic_problems(split_size("test", 19), seed=0, split="test", max_operand=19)
    small_train = arithmetic_problems(split_size("train", 19), seed=0, split="train", max_operand=19)
    assert len(small_test) + len(small_train) == 2 * 20 * 20
    assert all(int(x) <= 19 for p in small_train for x in re.findall(r"\d+", p.question))
    # A problem keeps its split whatever the operand range.
    full_test = {p.question for p in arithmetic_problems(split_size("test"), seed=0, split="test")}
    assert {p.question for p in small_test} <= full_test
    assert not {p.question for p in small_train} & full_test


def test_sampling_is_stratified_by_operand_digits():
    # Eight (operator, digits of a, digits of b) buckets, equally likely although the
    # 2x2-digit buckets hold 81 times more problems than the 1x1-digit ones.
    problems = arithmetic_problems(400, seed=0)
    counts = {}
    for p in problems:
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=\?", p.question).groups()
        counts[op, len(a), len(b)] = counts.get((op, len(a), len(b)), 0) + 1
    assert len(counts) == 8 and min(counts.values()) >= 30 and max(counts.values()) <= 70


@pytest.mark.parametrize("bad", [dict(n=-1, seed=0), dict(n=10**6, seed=0), dict(n=5, seed=0, split="dev"),
                                 dict(n=5, seed=0, max_operand=100), dict(n=800, seed=0, max_operand=19)])
def test_problem_arguments_are_validated(bad):
    with pytest.raises(ValueError):
        arithmetic_problems(**bad)


def test_tokenizer_round_trip_and_specials(tmp_path):
    tok = build_char_tokenizer()
    texts = [format_prompt(tok, p.question) + p.answer for p in arithmetic_problems(50, seed=0)]
    texts += ["Answer: \\boxed{\\frac{1}{2}}\n", "  two  spaces\tand tab ~!@#$%^&*()_+{}|:\"<>?"]
    for s in texts:
        ids = tok.encode(s, add_special_tokens=False)
        assert len(ids) == len(s)  # one token per character, nothing added
        assert tok.decode(ids) == s
        assert tok.unk_token_id not in ids
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert tok.decode([tok.encode("7")[0], tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == "7"
    assert not tok.chat_template
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for s in texts:
        assert loaded.encode(s, add_special_tokens=False) == tok.encode(s, add_special_tokens=False)
        assert loaded.decode(loaded.encode(s, add_special_tokens=False)) == s
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token) == ("<pad>", "</s>", "<s>")
    assert len(loaded) == len(tok)


def test_plain_prompt_format():
    tok = build_char_tokenizer()
    assert format_prompt(tok, "12+7=?") == "Q: 12+7=?\nA: "


def test_tiny_model_config_and_determinism():
    tok = build_char_tokenizer()
    m1 = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=5)
    m2 = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=5)
    m3 = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=6)
    cfg = m1.config
    assert cfg.vocab_size == len(tok) and cfg.tie_word_embeddings
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == \
        (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    assert m1.get_input_embeddings().weight.data_ptr() == m1.get_output_embeddings().weight.data_ptr()
    assert cfg._attn_implementation == "sdpa"  # CPU never asks for flash-attn
    w1, w2, w3 = (m.get_input_embeddings().weight for m in (m1, m2, m3))
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model(tok, hidden_size=30, num_heads=4)


def test_load_policy_none_and_bad_paths(tmp_path):
    model, tok = load_policy(None)
    assert model.config.vocab_size == len(tok)
    with pytest.raises(ValueError, match="does not exist"):
        load_policy(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="Hugging Face model directory"):
        load_policy(str(tmp_path))


def test_left_padded_generation_matches_one_by_one():
    # Prompts of different lengths share a left-padded batch; the padding must not change
    # what the model writes (attention mask and position ids handled by generate).
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=1)
    prompts = [format_prompt(tok, q) for q in ("1+2=?", "12+34=?", "99-5=?")]
    batched = generate_completions(model, tok, prompts, greedy=True, max_new_tokens=6)
    single = [generate_completions(model, tok, [p], greedy=True, max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    rng_before = torch.get_rng_state()
    sampled = generate_completions(model, tok, prompts, greedy=False, num_samples=3, max_new_tokens=6, seed=0)
    assert torch.equal(rng_before, torch.get_rng_state())  # the caller's RNG stream is untouched
    assert [len(s) for s in sampled] == [3, 3, 3]
    assert sampled == generate_completions(model, tok, prompts, greedy=False, num_samples=3, max_new_tokens=6, seed=0)


def test_checkpoint_generation_config_does_not_leak():
    # transformers 5 fills unset GenerationConfig fields from model.generation_config;
    # a checkpoint's penalties, top-k or min length must not change our decoding.
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=2)
    prompts = [format_prompt(tok, q) for q in ("3+4=?", "50-61=?")]
    greedy = generate_completions(model, tok, prompts, greedy=True, max_new_tokens=6)
    sampled = generate_completions(model, tok, prompts, greedy=False, num_samples=4, max_new_tokens=6, seed=3)
    own = model.generation_config
    own.repetition_penalty, own.no_repeat_ngram_size, own.min_new_tokens = 50.0, 1, 6
    own.top_k, own.top_p, own.min_p, own.temperature, own.do_sample = 1, 0.1, 0.9, 0.05, True
    assert generate_completions(model, tok, prompts, greedy=True, max_new_tokens=6) == greedy
    assert generate_completions(model, tok, prompts, greedy=False, num_samples=4, max_new_tokens=6, seed=3) == sampled
    assert model.generation_config is own and own.repetition_penalty == 50.0  # restored


def test_warm_start_learns_and_save_load_round_trip(tmp_path):
    # A short SFT run on a small model must bring the loss well below its start
    # (about log(101) = 4.6 for uniform predictions) and survive save/load unchanged.
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    problems = arithmetic_problems(1000, seed=0)
    logs = []
    metrics = warm_start(model, tok, problems, steps=60, lr=1e-2, batch_size=16, seed=0,
                         log=logs.append, log_every=20, eval_problems=arithmetic_problems(8, 0, "test"))
    losses = [float(re.search(r"loss ([0-9.]+)", line).group(1)) for line in logs[:3]]
    assert len(logs) == 4 and losses[-1] == pytest.approx(metrics["loss"], abs=1e-4)
    assert metrics["loss"] < 3.0 and metrics["loss"] < losses[0]
    assert metrics["token_accuracy"] > 0.2
    assert 0.0 <= metrics["greedy_accuracy"] <= 1.0 and metrics["steps"] == 60
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_policy(str(tmp_path))
    pre = loaded_tok.backend_tokenizer.pre_tokenizer
    assert pre.__getstate__() == tok.backend_tokenizer.pre_tokenizer.__getstate__()
    prompts = [format_prompt(tok, p.question) for p in arithmetic_problems(8, 1, "test")]
    assert generate_completions(loaded, loaded_tok, prompts, max_new_tokens=5) == generate_completions(
        model, tok, prompts, max_new_tokens=5
    )


def test_sft_command_saves_a_loadable_checkpoint(tmp_path):
    from lpreg.trainer import sft

    out = tmp_path / "sft"
    assert sft.main(["--output-dir", str(out), "--steps", "4", "--batch-size", "8", "--hidden-size", "32",
                     "--num-layers", "1", "--num-heads", "2", "--n-train", "40", "--n-eval", "4",
                     "--max-operand", "19"]) == 0
    saved = json.loads((out / "warm_start_metrics.json").read_text())
    assert saved["metrics"]["steps"] == 4 and saved["args"]["max_operand"] == 19
    model, tok = load_policy(str(out))
    assert model.config.hidden_size == 32 and tok.decode(tok.encode("Q: 1+2=?\nA: ")) == "Q: 1+2=?\nA: "
