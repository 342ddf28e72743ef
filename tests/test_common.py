"""Unit tests of common.py (and sft.py's pure pieces, and the RL scripts' get_scores built on it): each checked
against a deliberately naive, loop-based implementation or hand-computed values, and each correctness fact the
scripts rely on (padding, dropout, special tokens) shown to hold."""

import copy
import json
import math
import random
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

import common
import ppo
import ppo_max
import rrhf
import sft

# ---------------------------------------------------------------------------------------------
# Helpers: tiny models and naive reference implementations.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return common.toy_tokenizer()


def tiny_config(arch: str, tokenizer, **extra) -> GPT2Config | LlamaConfig:
    """A 2-layer, 32-dim GPT-2 or Llama config over `tokenizer`'s vocabulary, dropout off."""
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if arch == "gpt2":
        return GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **ids, **extra)
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=64, **ids, **extra)


def tiny_lm(arch: str, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer)).eval()


def tiny_scorer(arch: str, tokenizer, seed: int = 0):
    """A randomly initialized scalar-head sequence classifier (a stand-in reward model)."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(arch, tokenizer, num_labels=1)).eval()


def naive_log_softmax(logits: list[float], index: int, temperature: float = 1.0) -> float:
    """log softmax(logits / T)[index], one element at a time."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    return scaled[index] - top - math.log(sum(math.exp(x - top) for x in scaled))


@torch.no_grad()
def logprobs_alone(model, ids: list[int], start: int, temperature: float = 1.0) -> list[float]:
    """Log-probs of ids[start:] with the sequence run alone (no padding, default positions)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    return [naive_log_softmax(logits[t - 1].tolist(), ids[t], temperature) for t in range(start, len(ids))]


@torch.no_grad()
def score_alone(scorer, ids: list[int]) -> float:
    """A sequence classifier's own output on one unpadded sequence (it reads the last token)."""
    return scorer(input_ids=torch.tensor([ids])).logits[0, 0].item()


def words_to_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(w) for w in text.split()]


REVIEWS = [("the plot was", "very good . i loved it ."), ("i", "hated the ending . it was slow ."),
           ("it was not", "bad ."), ("the acting was extremely", "awful . the music was nice . i liked it .")]


def left_padded_queries(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return common.pad([common.encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, "left")


# ---------------------------------------------------------------------------------------------
# Log-probs: padding, position ids, temperature.
# ---------------------------------------------------------------------------------------------


def test_pad_left_and_right() -> None:
    seqs = [[5, 6, 7], [8]]
    ids, mask = common.pad(seqs, 0, "right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = common.pad(seqs, 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert common.position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_logprobs_equal_each_row_alone(arch: str, tok) -> None:
    """Log-probs of a left-padded batch (with mask-derived position ids) are those of each
    row run alone; responses are right-padded after EOS, and only masked tokens are compared."""
    model = tiny_lm(arch, tok)
    temperature = 0.7
    queries, query_mask = left_padded_queries(tok, [p for p, _ in REVIEWS])
    completions = [common.encode_completion(tok, c) for _, c in REVIEWS]
    responses, response_mask = common.pad(completions, tok.pad_token_id, "right")
    ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
    with torch.no_grad():
        logprobs = common.response_logprobs(model, ids, mask, queries.shape[1], temperature)
    assert logprobs.shape == responses.shape
    for i, (prompt, _) in enumerate(REVIEWS):
        prompt_ids = common.encode_prompt(tok, prompt)
        expected = logprobs_alone(model, prompt_ids + completions[i], len(prompt_ids), temperature)
        got = logprobs[i, :len(completions[i])].tolist()
        assert got == pytest.approx(expected, abs=1e-4)


def test_gpt2_without_position_ids_is_wrong_on_left_padded_rows(tok) -> None:
    """The trap is real: GPT-2 (learned absolute positions) does not derive position ids from the
    mask in a plain forward pass, so a left-padded row's log-probs are shifted by its padding."""
    model = tiny_lm("gpt2", tok)
    rows = [common.encode_prompt(tok, p) + common.encode_completion(tok, c) for p, c in REVIEWS]
    ids, mask = common.pad(rows, tok.pad_token_id, "left")
    with torch.no_grad():
        plain = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
        fixed = torch.log_softmax(common.forward(model, ids, mask).logits, -1)
    for i, row in enumerate(rows):
        alone = torch.tensor([logprobs_alone(model, row, 1)])
        width = len(row)
        gather = torch.tensor(row[1:])
        plain_row = plain[i, -width:-1].gather(-1, gather[:, None]).squeeze(-1)
        fixed_row = fixed[i, -width:-1].gather(-1, gather[:, None]).squeeze(-1)
        assert torch.allclose(fixed_row, alone, atol=1e-4)
        if width < ids.shape[1]:  # a padded row: wrong without position ids
            assert (plain_row - alone).abs().max() > 0.01
        else:  # the longest row has no padding: the same either way
            assert torch.allclose(plain_row, alone, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_logprobs_from_logits_with_temperature(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=gen) * 3
    labels = torch.randint(0, 7, (2, 3), generator=gen)
    got = common.logprobs_from_logits(logits, labels, temperature)
    for b in range(2):
        for t in range(3):
            expected = naive_log_softmax(logits[b, t].tolist(), labels[b, t].item(), temperature)
            assert got[b, t].item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Responses: truncation after EOS, lengths, generation.
# ---------------------------------------------------------------------------------------------


def naive_response_mask(row: list[int], eos_id: int) -> tuple[list[int], bool]:
    mask, ended = [], False
    for token in row:
        mask.append(0 if ended else 1)
        ended = ended or token == eos_id
    return mask, eos_id in row


def test_truncate_after_eos_and_response_length() -> None:
    eos, pad_id = 2, 0
    rows = [[5, 2, 7, 2],  # EOS in the middle, and a second one after it
            [5, 6, 7, 8],  # no EOS: hit the length limit
            [2, 5, 6, 0],  # EOS first: an empty response
            [5, 6, 7, 2]]  # EOS last
    mask, ended = common.truncate_after_eos(torch.tensor(rows), eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, False, True, True]
    responses = torch.tensor(rows).masked_fill(mask == 0, pad_id)
    lengths = common.response_length(responses, mask, eos)  # EOS excluded
    assert lengths.tolist() == [1, 4, 0, 3]


@pytest.mark.parametrize("temperature", [0.9, 1.0])
def test_generate_pads_after_eos_and_its_logprobs_are_the_forward_logprobs(tok, temperature: float) -> None:
    model = tiny_lm("gpt2", tok)
    # Make EOS likely (about 1 in 10 per token) so that some rows end and some hit the limit.
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + 2.3 * torch.nn.functional.one_hot(
        torch.tensor(tok.eos_token_id), out.shape[-1]))
    prompts = [p for p, _ in REVIEWS] * 4
    queries, query_mask = left_padded_queries(tok, prompts)
    torch.manual_seed(0)
    max_new_tokens = 16
    responses, response_mask, ended, gen_logprobs = common.generate(model, queries, query_mask, tok,
                                                                    max_new_tokens, temperature)
    assert responses.shape[1] <= max_new_tokens and gen_logprobs.shape == responses.shape
    assert ended.any() and not ended.all()
    for i, row in enumerate(responses.tolist()):
        mask, has_eos = naive_response_mask(row, tok.eos_token_id)
        assert response_mask[i].tolist() == mask and bool(ended[i]) == has_eos
        assert all(token == tok.pad_token_id for token, m in zip(row, mask) if m == 0)
    # Old log-probs read from the generation's own logits, step by step, equal a forward pass's (at a temperature
    # other than 1 too: the logits are read before transformers' own temperature, and divided once).
    ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
    with torch.no_grad():
        forward_logprobs = common.response_logprobs(model, ids, mask, queries.shape[1], temperature)
    assert torch.allclose(gen_logprobs * response_mask, forward_logprobs * response_mask, atol=1e-4)


def test_generate_ignores_the_models_own_generation_config(tok) -> None:
    """Sampling settings in a hub model's generation config (here: a suppressed token) would make
    the samples disagree with the log-probs we compute; generate() must use only ours."""
    model = tiny_lm("gpt2", tok)
    queries, query_mask = left_padded_queries(tok, [p for p, _ in REVIEWS])
    with torch.no_grad():
        first = model(input_ids=queries, attention_mask=query_mask,
                      position_ids=common.position_ids(query_mask)).logits[:, -1].argmax(-1)
    model.generation_config.suppress_tokens = first.unique().tolist()
    model.generation_config.repetition_penalty = 5.0
    responses, _, _, _ = common.generate(model, queries, query_mask, tok, 4, greedy=True)
    assert responses[:, 0].tolist() == first.tolist()  # greedy = argmax of the raw logits
    assert model.generation_config.suppress_tokens == first.unique().tolist()  # the model's config is restored


def test_decode_responses_stops_at_eos_and_shows_other_special_tokens(tok) -> None:
    rows = ["very good . <eos> <pad> <pad>", "very <pad> good . <eos> <pad>", "very good . i loved it"]
    responses = torch.tensor([words_to_ids(tok, r) for r in rows])
    response_mask, _ = common.truncate_after_eos(responses, tok.eos_token_id)
    texts = common.decode_responses(tok, responses, response_mask)
    assert texts == ["very good .", "very <pad> good .", "very good . i loved it"]
    # a special token sampled mid-sentence makes it malformed for the gold reward
    assert common.well_formed("the plot was", texts[0]) == 1.0 and common.well_formed("the plot was", texts[1]) == 0.0


def test_toy_models_of_one_seed_are_equal_and_score_models_start_at_zero(tok) -> None:
    torch.manual_seed(3)  # what setup() does (through transformers.set_seed)
    a, b = common.load_model("toy", tok), common.load_model("toy", tok)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    torch.manual_seed(4)
    c = common.load_model("toy", tok)
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    scorer = common.TokenScores(common.load_model("toy", tok, "score"))
    queries, query_mask = left_padded_queries(tok, [p for p, _ in REVIEWS])
    assert torch.equal(scorer(queries, query_mask), torch.zeros(queries.shape))


def test_load_model_turns_off_dropout_modules_and_llama_attention_dropout(tok, tmp_path: Path) -> None:
    """Dropout off in every model (it would make PPO's ratios and a pair's scores noisy),
    including the plain float that Llama-style attention keeps instead of an nn.Dropout."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", tok,
                                                 attention_dropout=0.5)).save_pretrained(tmp_path / "llama")
    gpt2 = tiny_config("gpt2", tok)
    gpt2.resid_pdrop = gpt2.embd_pdrop = gpt2.attn_pdrop = 0.3
    AutoModelForCausalLM.from_config(gpt2).save_pretrained(tmp_path / "gpt2")
    llama = common.load_model(str(tmp_path / "llama"), tok)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "llama").config.attention_dropout == 0.5  # saved with it
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in llama.modules())
    for kind in ("causal", "score"):
        model = common.load_model(str(tmp_path / "gpt2"), tok, kind)
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert dropouts and all(m.p == 0.0 for m in dropouts)


def test_a_score_model_from_a_causal_lm_gets_a_zero_head_and_a_saved_one_keeps_its_own(tok, tmp_path: Path) -> None:
    tiny_lm("gpt2", tok).save_pretrained(tmp_path / "lm")
    tiny_scorer("gpt2", tok).save_pretrained(tmp_path / "rm")
    fresh = common.load_model(str(tmp_path / "lm"), tok, "score")
    assert torch.equal(fresh.score.weight, torch.zeros_like(fresh.score.weight))  # N+: a new value head outputs 0
    saved = common.load_model(str(tmp_path / "rm"), tok, "score")
    assert torch.equal(saved.score.weight, tiny_scorer("gpt2", tok).score.weight)


# ---------------------------------------------------------------------------------------------
# SFT: completion masking and loss.
# ---------------------------------------------------------------------------------------------


def test_sft_tokenize_masks_the_prompt_and_learns_eos(tok, capsys) -> None:
    [(ids, labels)] = sft.tokenize([{"prompt": "the plot was", "completion": "very good ."}], tok, 128)
    prompt, completion = words_to_ids(tok, "the plot was"), words_to_ids(tok, "very good .")
    assert ids == [tok.bos_token_id, *prompt, *completion, tok.eos_token_id]  # no second <bos> before the completion
    assert labels == [-100] * (1 + len(prompt)) + completion + [tok.eos_token_id]
    # an example longer than max_length is left out (cut, it would teach a response without its EOS)
    rows = [{"prompt": "the plot was", "completion": "very good ."}, {"prompt": "it was", "completion": "good ."}]
    short = words_to_ids(tok, "it was good .")
    assert sft.tokenize(rows, tok, 6) == [([tok.bos_token_id, *short, tok.eos_token_id],
                                           [-100] * 3 + short[2:] + [tok.eos_token_id])]
    assert capsys.readouterr().out == "note: 1 of 2 examples are longer than 6 tokens: left out\n"
    with pytest.raises(SystemExit) as exit_info:
        sft.tokenize(rows, tok, 5)
    assert "no example fits in 5 tokens" in one_line_error(exit_info, capsys)


def test_sft_completion_loss_matches_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, generator=gen)
    labels = torch.tensor([[-100, -100, 3, 1, 2], [-100, 4, 2, -100, -100]])
    terms = [-naive_log_softmax(logits[b, t].tolist(), labels[b, t + 1].item())
             for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    assert sft.completion_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# The toy world: gold reward, well-formedness, length reward, tokenizer, datasets.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, completion, expected", [
    ("the plot was", "good .", 1.0),
    ("the plot was", "very good .", 1.5),  # intensifier x1.5
    ("it was", "extremely awful .", -4.0),  # x2 on -2
    ("it was not", "bad .", 0.5),  # negation x-0.5 on -1
    ("i did not", "like it .", -0.5),
    ("i really", "loved the music .", 3.0),  # adverb x1.5 on +2
    ("it was not", "very good .", -0.75),  # 1 x -0.5 x 1.5
    ("the plot was", "good . it was awful .", -0.5),  # mean of +1 and -2
    ("i loved", "it . i loved it . i loved it .", 2.0 - 2.0),  # one unique sentence, two repeats
    ("the plot", "good was .", -2.0),  # malformed, no valid sentence
    ("the plot was", "good . was it good", 1.0 - 2.0),  # a trailing fragment is malformed
    ("the plot was good .", "", 1.0),  # empty completion of a complete prompt
    ("the plot was", "", -2.0),  # empty completion of an unfinished sentence
    ("", "", 0.0),
])
def test_gold_reward_on_hand_written_reviews(prompt: str, completion: str, expected: float) -> None:
    assert common.gold_reward(prompt, completion) == pytest.approx(expected)


def test_well_formed_rate() -> None:
    assert common.well_formed("the plot was", "good . i loved it .") == 1.0
    assert common.well_formed("the plot was", "good . plot good .") == 0.5
    assert common.well_formed("it was", "good . was . good") == pytest.approx(1 / 3)
    assert common.well_formed("", "") == 0.0


def test_length_reward() -> None:
    n = torch.tensor([20, 10, 30, 0, 40, 50, 15])
    assert common.length_reward(n, 20).tolist() == pytest.approx([1.0, 0.5, 0.5, 0.0, 0.0, -0.5, 0.75])


def test_toy_tokenizer_round_trips_through_save_pretrained(tok, tmp_path: Path) -> None:
    specials = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
    assert len(set(specials)) == 4 and None not in specials
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert [loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id] == specials
    assert loaded.get_vocab() == tok.get_vocab()
    for text in ["the plot was very good .", "i did not like it . xyzzy", ""]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    ids = tok("the plot was xyzzy")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.unk_token_id
    assert loaded.decode(tok("i loved it .")["input_ids"], skip_special_tokens=True) == "i loved it ."


def test_toy_datasets_are_deterministic_and_grammatical() -> None:
    make = common.toy_dataset.__wrapped__  # bypass the cache: build twice for real
    first, again = make("sft", 0, 64, 8), make("sft", 0, 64, 8)
    assert first["train"].to_list() == again["train"].to_list() and first["test"].to_list() == again["test"].to_list()
    assert make("sft", 1, 64, 8)["train"].to_list() != first["train"].to_list()
    for row in first["train"]:
        assert 2 <= len(row["prompt"].split()) <= 4 and row["completion"]
        assert common.well_formed(row["prompt"], row["completion"]) == 1.0
    preference = make("preference", 0, 64, 8)
    assert preference["train"].to_list() == make("preference", 0, 64, 8)["train"].to_list()
    for row in preference["train"]:
        assert common.well_formed(row["prompt"], row["chosen"]) == 1.0
        assert common.well_formed(row["prompt"], row["rejected"]) == 1.0


def test_toy_demonstrations_are_the_best_of_their_drafts(monkeypatch) -> None:
    """The prompts split's demonstrations: the same prompts whatever the number of drafts, each demonstration a
    grammatical continuation at least as good by gold as the row's own review (the first draft), and on average
    better than the SFT data's completions by a clear margin."""
    make = common.toy_dataset.__wrapped__
    experts = make("prompts", 0, 500, 8)["train"].to_list()
    monkeypatch.setattr(common, "EXPERT_DRAFTS", 1)  # one draft: the row's own review, as in the SFT data
    plain = make("prompts", 0, 500, 8)["train"].to_list()
    assert [r["prompt"] for r in experts] == [r["prompt"] for r in plain]
    gold = [(common.gold_reward(e["prompt"], e["completion"]), common.gold_reward(p["prompt"], p["completion"]))
            for e, p in zip(experts, plain)]
    assert all(common.well_formed(r["prompt"], r["completion"]) == 1.0 for r in experts)
    assert all(g_expert >= g_plain for g_expert, g_plain in gold)
    sft = make("sft", 0, 500, 8)["train"].to_list()
    sft_gold = sum(common.gold_reward(r["prompt"], r["completion"]) for r in sft) / len(sft)
    assert sum(g for g, _ in gold) / len(gold) > sft_gold + 0.5


def annotator_stats(rows: list[dict]) -> tuple[float, float, int]:
    """Agreement of the labels with gold on pairs of different gold; on gold ties of different
    length, the fraction where the longer review was chosen, and the number of such ties."""
    agree = decided = longer_chosen = length_ties = 0
    for row in rows:
        gold_chosen = common.gold_reward(row["prompt"], row["chosen"])
        gold_rejected = common.gold_reward(row["prompt"], row["rejected"])
        if gold_chosen != gold_rejected:
            decided += 1
            agree += gold_chosen > gold_rejected
            assert row["gold_chosen_better"] == (gold_chosen > gold_rejected)
        elif len(row["chosen"].split()) != len(row["rejected"].split()):
            length_ties += 1
            longer_chosen += len(row["chosen"].split()) > len(row["rejected"].split())
    assert decided and length_ties, "no pair of different gold, or no gold tie of different length"
    return agree / decided, longer_chosen / length_ties, length_ties


def test_toy_annotator_agrees_with_gold_72_to_82_percent_and_prefers_longer() -> None:
    rows = common.toy_dataset("preference")["train"].to_list()
    assert len(rows) == 8000
    agreement, longer_on_ties, length_ties = annotator_stats(rows)
    assert 0.72 <= agreement <= 0.82  # label noise (the world's calibration): the accuracy ceiling of a reward model
    assert length_ties > 50 and longer_on_ties > 0.6  # the length bias, at equal gold


def test_toy_dataset_sizes() -> None:
    """The defaults (4,000 sft and prompt rows, 8,000 pairs), and n_train=0 means no rows, not the default."""
    assert [len(common.toy_dataset(kind)["train"]) for kind in ("sft", "prompts", "preference")] == [4000, 4000, 8000]
    assert len(common.toy_dataset("sft", n_train=0, n_test=3)["train"]) == 0
    assert len(common.toy_dataset("sft", n_train=0, n_test=3)["test"]) == 3


def test_toy_annotator_k_sets_the_noise_and_c_the_length_bias() -> None:
    """Near-noiseless (k=50) and length-blind (c=0): labels follow gold, and gold ties are coin flips."""
    rows = common.toy_dataset("preference", n_train=2000, n_test=8, k=50.0, c=0.0)["train"].to_list()
    agreement, longer_on_ties, length_ties = annotator_stats(rows)
    assert agreement > 0.98
    assert length_ties > 30 and 0.3 < longer_on_ties < 0.7


# ---------------------------------------------------------------------------------------------
# Data formats and loading.
# ---------------------------------------------------------------------------------------------

HH_CHOSEN = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6, I think."
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: Go away."
USER = {"role": "user", "content": "how was the movie ?"}

FORMATS = {  # name: (stage, row, expected standardized fields)
    "prompt-only": ("prompts", {"prompt": "the plot was"}, {"prompt": "the plot was", "completion": None}),
    "prompt/completion": ("sft", {"prompt": "the plot was", "completion": "good ."},
                          {"prompt": "the plot was", "completion": "good ."}),
    "explicit preference": ("preference", {"prompt": "it was", "chosen": "good .", "rejected": "bad ."},
                            {"prompt": "it was", "chosen": "good .", "rejected": "bad ."}),
    "HH-RLHF raw": ("preference", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
                    {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:",
                     "chosen": " 6, I think.", "rejected": " Go away."}),
    "RRHF": ("preference", {"query": "it was", "responses": ["okay .", "great .", "awful ."],
                            "scores": [0.1, 2.0, -1.0]},
             {"prompt": "it was", "completion": "great .", "chosen": "great .", "rejected": "awful ."}),
}


@pytest.mark.parametrize("name", FORMATS)
def test_standard_formats_through_load_data(name: str, tok, tmp_path: Path) -> None:
    stage, row, expected = FORMATS[name]
    assert {k: common.standardize_row(row, tok)[k] for k in expected} == expected
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(5)))
    train, test = common.load_data(str(path), stage, tok, test_rows=2)
    assert len(train) == 3 and len(test) == 2  # no test split: the last rows are held out
    assert {k: train[0][k] for k in expected} == expected


def assert_conversational_prompt(prompt: str, tokenizer) -> None:
    """Without a chat template, turns are joined HH-style and end with the assistant's cue."""
    assert tokenizer.chat_template is None
    assert USER["content"] in prompt and prompt.endswith(common.HH_ASSISTANT)


@pytest.mark.parametrize("stage, row", [
    ("prompts", {"prompt": [USER]}),
    ("sft", {"messages": [USER, {"role": "assistant", "content": "great ."}]}),
    ("sft", {"prompt": [USER], "completion": [{"role": "assistant", "content": "great ."}]}),
    ("preference", {"prompt": [USER], "chosen": [{"role": "assistant", "content": "great ."}],
                    "rejected": [{"role": "assistant", "content": "bad ."}]}),
    ("preference", {"chosen": [USER, {"role": "assistant", "content": "great ."}],  # implicit prompt
                    "rejected": [USER, {"role": "assistant", "content": "bad ."}]}),
])
def test_conversational_formats_through_load_data(stage: str, row: dict, tok, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(4)))
    train, _ = common.load_data(str(path), stage, tok, test_rows=1)
    assert_conversational_prompt(train[0]["prompt"], tok)
    if stage == "sft":
        assert train[0]["completion"] == "great ."
    if stage == "preference":
        assert (train[0]["chosen"], train[0]["rejected"]) == ("great .", "bad .")


def test_conversational_prompt_uses_the_chat_template() -> None:
    tokenizer = common.toy_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    row = common.standardize_row({"messages": [USER, {"role": "assistant", "content": "great ."}]}, tokenizer)
    assert row["prompt"] == "<user>how was the movie ?<assistant>" and row["completion"] == "great ."


def test_parquet_file_and_save_to_disk_folders(tok, tmp_path: Path) -> None:
    rows = [{"prompt": f"it was {adjective}", "completion": "."} for adjective in ("good", "bad", "fine", "okay")]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    train, test = common.load_data(str(tmp_path / "data.parquet"), "sft", tok, test_rows=1)
    assert [r["prompt"] for r in train + test] == [r["prompt"] for r in rows] and len(test) == 1

    DatasetDict(train=Dataset.from_list(rows[:3]),
                test=Dataset.from_list(rows[3:])).save_to_disk(str(tmp_path / "dict"))
    train, test = common.load_data(str(tmp_path / "dict"), "sft", tok, test_rows=8)
    assert [r["prompt"] for r in train] == [r["prompt"] for r in rows[:3]] and test[0]["prompt"] == "it was okay"

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))  # one Dataset: it is the train split
    train, test = common.load_data(str(tmp_path / "single"), "sft", tok, test_rows=2, max_train_rows=1)
    assert ([r["prompt"] for r in train] == ["it was good"]
            and [r["prompt"] for r in test] == ["it was fine", "it was okay"])


def test_small_dataset_holds_out_at_most_half(tok, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": "it was", "completion": f"{w} ."}) + "\n"
                            for w in ("good", "bad", "fine")))
    train, test = common.load_data(str(path), "sft", tok, test_rows=256)
    assert [r["completion"] for r in train] == ["good .", "bad ."] and [r["completion"] for r in test] == ["fine ."]
    path.write_text(json.dumps({"prompt": "it was", "completion": "good ."}) + "\n")
    with pytest.raises(SystemExit):  # one row cannot be split into train and held-out rows
        common.load_data(str(path), "sft", tok)


@pytest.mark.parametrize("stage, row, says", [
    ("sft", {"text": "it was good .", "label": 1}, "['text', 'label']"),  # fits no format
    ("sft", {"prompt": "it was good ."}, "needs"),  # prompt-only, but SFT needs completions
])
def test_unusable_columns_exit_2_with_one_line(stage: str, row: dict, says: str, tok, tmp_path: Path, capsys) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(4)))
    with pytest.raises(SystemExit) as exit_info:
        common.load_data(str(path), stage, tok, test_rows=1)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and says in err and "prompt/completion" in err


def test_missing_dataset_file_exits_2(tok, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        common.load_data(str(tmp_path / "missing.jsonl"), "sft", tok)
    assert exit_info.value.code == 2




def one_line_error(exit_info, capsys, code: int = 2) -> str:
    """The error a fail() (or the divergence guard) printed: exit status `code`, one stderr line."""
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_empty_and_malformed_jsonl_files_exit_2_naming_the_line(tok, tmp_path: Path, capsys) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n\n")
    with pytest.raises(SystemExit) as exit_info:
        common.load_data(str(path), "sft", tok)
    assert "is empty" in one_line_error(exit_info, capsys)
    good = json.dumps({"prompt": "it was", "completion": "good ."})
    path.write_text(f"{good}\n\n{good}\n{good[:-1]}\n{good}\n")  # the blank line 2 counts: the bad row is line 4
    with pytest.raises(SystemExit) as exit_info:
        common.load_data(str(path), "sft", tok)
    assert "line 4: not valid JSON" in one_line_error(exit_info, capsys)


def test_an_empty_split_exits_2_with_one_line(tok, tmp_path: Path, capsys, monkeypatch) -> None:
    rows = Dataset.from_list([{"prompt": "it was", "completion": "good ."}] * 3)
    empty = Dataset.from_dict({"prompt": [], "completion": []})
    DatasetDict(train=rows, test=empty).save_to_disk(str(tmp_path / "data"))
    with pytest.raises(SystemExit) as exit_info:  # a save_to_disk folder: found before datasets fails on it
        common.load_data(str(tmp_path / "data"), "sft", tok)
    assert one_line_error(exit_info, capsys).strip() == f"error: dataset {tmp_path / 'data'} has an empty 'test' split"
    empty.save_to_disk(str(tmp_path / "none"))  # a single Dataset, empty: the train split
    with pytest.raises(SystemExit) as exit_info:
        common.load_data(str(tmp_path / "none"), "sft", tok)
    assert "has an empty 'train' split" in one_line_error(exit_info, capsys)
    monkeypatch.setattr(common, "_load_splits", lambda name, config: DatasetDict(train=rows, test=empty))
    with pytest.raises(SystemExit) as exit_info:  # an empty split from the hub
        common.load_data("org/data", "sft", tok)
    assert "empty 'test' split" in one_line_error(exit_info, capsys)
    monkeypatch.setattr(common, "_load_splits", lambda name, config: DatasetDict(train=empty, test=rows))
    with pytest.raises(SystemExit) as exit_info:  # no train rows
        common.load_data("org/data", "sft", tok)
    one_line_error(exit_info, capsys)


@pytest.mark.parametrize("name", ["/nonexistent/model", "./missing", "runs/missing_sft", "a/b/c"])
def test_missing_local_model_path_exits_2(name: str, tok, capsys) -> None:
    for load in (lambda: common.load_tokenizer(name, "run `python sft.py` first"),
                 lambda: common.load_model(name, tok, "score", "run `python sft.py` first")):
        with pytest.raises(SystemExit) as exit_info:
            load()
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: {name} not found: run `python sft.py` first\n"


@pytest.mark.parametrize("name", ["gpt2", "EleutherAI/pythia-160m"])
def test_hub_ids_are_not_mistaken_for_missing_paths(name: str, capsys) -> None:
    assert common._check_exists(name, "unused") is None  # left to the hub to resolve: no error, no exit
    assert capsys.readouterr().err == ""


def test_truncated_model_weights_exit_2_with_one_line(tok, tmp_path: Path, capsys) -> None:
    tiny_lm("gpt2", tok).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # a copy cut short
    for kind in ("causal", "score"):
        with pytest.raises(SystemExit) as exit_info:
            common.load_model(str(tmp_path), tok, kind, hint="copy it again")
        err = one_line_error(exit_info, capsys)
        assert err.startswith(f"error: cannot load a model from {tmp_path}") and err.endswith("copy it again\n")


def test_a_tokenizer_without_eos_exits_2(tmp_path: Path, capsys) -> None:
    backend = Tokenizer(models.WordLevel({common.UNK: 0, "good": 1}, unk_token=common.UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=common.UNK).save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        common.load_tokenizer(str(tmp_path))
    assert "no EOS token" in one_line_error(exit_info, capsys)


def test_a_tokenizer_without_pad_pads_with_eos_on_the_left(tmp_path: Path) -> None:
    other = other_tokenizer()
    other.pad_token = None
    other.save_pretrained(tmp_path)
    loaded = common.load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id and loaded.padding_side == "left"


def test_encode_prompts_keeps_the_end_of_long_prompts_and_counts_them(tok, capsys) -> None:
    prompts = ["it was", "the plot was very", "i really loved the music"]
    queries = common.encode_prompts(tok, prompts, max_tokens=4)
    assert queries == [[tok.bos_token_id, *words_to_ids(tok, "it was")],  # the end is what a response continues
                       words_to_ids(tok, "the plot was very"), words_to_ids(tok, "really loved the music")]
    assert capsys.readouterr().out == "note: 2 of 3 prompts are longer than 4 tokens and lose their start\n"
    assert common.encode_prompts(tok, prompts, max_tokens=100) == [common.encode_prompt(tok, p) for p in prompts]
    assert capsys.readouterr().out == ""  # nothing cut, nothing said
    with pytest.raises(SystemExit) as exit_info:  # --max_new_tokens leaves no position for a prompt
        common.encode_prompts(tok, prompts, max_tokens=0)
    assert "--max_new_tokens" in one_line_error(exit_info, capsys)


# ---------------------------------------------------------------------------------------------
# Scoring: per-token scores, last-token scores, and the RL scripts' get_scores that combines them.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_scores_read_the_last_real_token(arch: str, side: str, tok) -> None:
    scorer = tiny_scorer(arch, tok)
    rows = [common.encode_prompt(tok, p) + common.encode_completion(tok, c) for p, c in REVIEWS]
    ids, mask = common.pad(rows, tok.pad_token_id, side)
    with torch.no_grad():
        scores = common.last_token_scores(common.TokenScores(scorer), ids, mask)
    assert scores.tolist() == pytest.approx([score_alone(scorer, row) for row in rows], abs=1e-4)


def other_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the toy words with different ids and special-token order, and no
    BOS: a reward model from another family than the policy."""
    vocab = {w: i for i, w in enumerate([common.UNK, common.EOS, common.PAD] + sorted(common.TOY_WORDS, reverse=True))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=common.UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=common.PAD, eos_token=common.EOS,
                                   unk_token=common.UNK)


def policy_responses(tok) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """REVIEWS' completions as generate() returns them: EOS, then pad; the longest row hit the
    length limit without its EOS. -> completion ids, responses (B, R), response_mask (B, R)."""
    completions = [common.encode_completion(tok, c) for _, c in REVIEWS]
    completions[3] = completions[3][:-1]
    assert len(completions[3]) == max(len(c) for c in completions)
    responses, _ = common.pad(completions, tok.pad_token_id, "right")
    response_mask, _ = common.truncate_after_eos(responses, tok.eos_token_id)
    return completions, responses, response_mask


SCORING_SCRIPTS = [ppo, ppo_max, rrhf]  # rcfd.py's get_scores, a closure of several components, is not among them


@pytest.mark.parametrize("script", SCORING_SCRIPTS, ids=lambda script: script.__name__)
@pytest.mark.parametrize("same_tokenizer", [True, False])
def test_reward_model_scores_match_scoring_the_text_directly(script, same_tokenizer: bool, tok, tmp_path: Path) -> None:
    """A script's get_scores with --reward model: the policy's ids as they are, or (another tokenizer)
    retokenize() to the reward model's; then last_token_scores. It must equal the reward model run on
    the text alone."""
    rm_tok = tok if same_tokenizer else other_tokenizer()
    tiny_scorer("gpt2", rm_tok).save_pretrained(tmp_path)
    rm_tok.save_pretrained(tmp_path)
    rm_tokenizer = common.load_tokenizer(str(tmp_path))  # as the script loads them
    scorer = common.load_model(str(tmp_path), rm_tokenizer, "score")
    prompts = [p for p, _ in REVIEWS]
    queries, query_mask = left_padded_queries(tok, prompts)
    completions, responses, response_mask = policy_responses(tok)
    scores = script.get_scores(prompts, queries, query_mask, responses, response_mask, reward="model", tokenizer=tok,
                               device=torch.device("cpu"), target_length=8, reward_model=common.TokenScores(scorer),
                               rm_tokenizer=rm_tokenizer, same_vocab=same_tokenizer)

    expected = []
    for prompt, completion in zip(prompts, completions):
        text = " ".join(tok.convert_ids_to_tokens([t for t in completion if t != tok.eos_token_id]))
        ids = rm_tok(prompt)["input_ids"] + rm_tok(text, add_special_tokens=False)["input_ids"]
        ended = tok.eos_token_id in completion  # a response cut at the limit is scored at its last token
        expected.append(score_alone(scorer, ids + [rm_tok.eos_token_id] * ended))
    assert scores.tolist() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("script", SCORING_SCRIPTS, ids=lambda script: script.__name__)
def test_gold_and_length_rewards_of_generated_responses(script, tok) -> None:
    """A script's get_scores with --reward gold scores decode_responses' text, with --reward length it counts
    response_length's tokens (EOS excluded): against the reviews' own text and hand counts."""
    prompts = [p for p, _ in REVIEWS]
    queries, query_mask = left_padded_queries(tok, prompts)
    _, responses, response_mask = policy_responses(tok)
    assert common.decode_responses(tok, responses, response_mask) == [c for _, c in REVIEWS]
    lengths = common.response_length(responses, response_mask, tok.eos_token_id)
    assert lengths.tolist() == [len(c.split()) for _, c in REVIEWS]
    batch, cpu = (prompts, queries, query_mask, responses, response_mask), torch.device("cpu")
    gold = script.get_scores(*batch, reward="gold", tokenizer=tok, device=cpu, target_length=8)
    assert gold.tolist() == pytest.approx([common.gold_reward(p, c) for p, c in REVIEWS])
    length = script.get_scores(*batch, reward="length", tokenizer=tok, device=cpu, target_length=8)
    assert length.tolist() == pytest.approx([1 - abs(len(c.split()) / 8 - 1) for _, c in REVIEWS])


# ---------------------------------------------------------------------------------------------
# Evaluation on held-out prompts.
# ---------------------------------------------------------------------------------------------


def test_evaluate_samples_kl_and_score_match_a_naive_recomputation(tok) -> None:
    """evaluate(): each sample's KL is sum_t log pi - log pi_ref over its response tokens (EOS
    included), recomputed here by running each prompt + response alone; the metrics are the means
    of the samples; sampling has its own seed and leaves the training RNG as it was."""
    policy, ref_policy = tiny_lm("gpt2", tok, seed=0), tiny_lm("gpt2", tok, seed=1)
    policy.lm_head.register_forward_hook(lambda module, inputs, out: out + 1.5 * torch.nn.functional.one_hot(
        torch.tensor(tok.eos_token_id), out.shape[-1]))  # some responses end, some hit the limit
    prompts = [p for p, _ in REVIEWS] * 2
    queries = [common.encode_prompt(tok, p) for p in prompts]

    def score_fn(prompts, queries, query_mask, responses, response_mask):  # a stand-in reward: the length
        return common.response_length(responses, response_mask, tok.eos_token_id).float()

    temperature, max_new_tokens = 0.8, 8
    state = torch.get_rng_state()
    metrics, samples = common.evaluate(policy, ref_policy, tok, prompts, queries, score_fn, max_new_tokens,
                                       temperature, batch_size=3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert common.evaluate(policy, ref_policy, tok, prompts, queries, score_fn, max_new_tokens, temperature,
                           batch_size=3, seed=5)[1] == samples  # the same samples again: the policy's change shows
    assert [s["index"] for s in samples] == list(range(len(prompts))) and [s["prompt"] for s in samples] == prompts
    assert any(s["eos"] for s in samples) and not all(s["eos"] for s in samples)
    for s, query in zip(samples, queries):
        response = words_to_ids(tok, s["response"]) + [tok.eos_token_id] * s["eos"]
        assert s["length"] == len(response) - s["eos"] and s["score"] == s["length"]
        assert s["eos"] or len(response) == max_new_tokens
        kl = sum(a - b for a, b in zip(logprobs_alone(policy, query + response, len(query), temperature),
                                       logprobs_alone(ref_policy, query + response, len(query), temperature)))
        assert s["kl"] == pytest.approx(kl, abs=1e-4)
    for key, name in (("score", "reward"), ("kl", "kl"), ("length", "length"), ("eos", "eos_rate")):
        assert metrics[name] == pytest.approx(sum(float(s[key]) for s in samples) / len(samples))


# ---------------------------------------------------------------------------------------------
# Several processes, in one: masked_mean, all_mean, gather.
# ---------------------------------------------------------------------------------------------


def test_masked_mean_all_mean_and_gather_in_one_process() -> None:
    gen = torch.Generator().manual_seed(0)
    x, mask = torch.randn(3, 5, generator=gen), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    entries = [x[b, t].item() for b in range(3) for t in range(5) if mask[b, t]]
    assert common.masked_mean(x, mask).item() == pytest.approx(sum(entries) / len(entries), abs=1e-6)
    assert common.masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # no entry: 0, not NaN
    assert common.world_size() == 1 and common.rank() == 0
    assert torch.equal(common.all_mean(x), x)
    assert torch.equal(common.gather(x), x) and common.gather([{"a": 1}, 2]) == [{"a": 1}, 2]


# ---------------------------------------------------------------------------------------------
# Arguments, the start of a run, and the run folder.
# ---------------------------------------------------------------------------------------------


@dataclass
class FlagArgs:
    learning_rate: float = 1e-3
    batch_size: int = 8
    kl_coef: float = 0.0
    max_train_rows: int | None = None
    resume: bool = False
    overwrite: bool = False


CHECKS = {"positive": ("learning_rate", "batch_size", "max_train_rows"), "nonnegative": ("kl_coef",)}


@pytest.mark.parametrize("flags, says", [
    ({"batch_size": 0}, "--batch_size must be positive, got 0"),
    ({"learning_rate": -1e-3}, "--learning_rate must be positive, got -0.001"),
    ({"learning_rate": float("nan")}, "--learning_rate must be positive, got nan"),
    ({"max_train_rows": 0}, "--max_train_rows must be positive, got 0"),
    ({"kl_coef": -0.1}, "--kl_coef must be at least 0, got -0.1"),
    ({"kl_coef": float("nan")}, "--kl_coef must be at least 0, got nan"),
    ({"resume": True, "overwrite": True}, "--resume continues a run and --overwrite replaces it"),
])
def test_check_args_exits_2_naming_the_flag(flags: dict, says: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        common.check_args(FlagArgs(**flags), **CHECKS)
    assert says in one_line_error(exit_info, capsys)


def test_check_args_lets_good_values_and_none_through(capsys) -> None:
    for flags in ({}, {"kl_coef": 0.0, "max_train_rows": None}, {"max_train_rows": 5, "resume": True},
                  {"overwrite": True}):
        common.check_args(FlagArgs(**flags), **CHECKS)
    assert capsys.readouterr().err == ""


@dataclass
class RunArgs:
    output_dir: str
    device: str = "cpu"
    seed: int = 1
    resume: bool = False
    overwrite: bool = False
    track: bool = False


@pytest.fixture
def start():
    """common.setup, with the process's Ctrl-C handler put back afterwards."""
    handler = signal.getsignal(signal.SIGINT)
    yield common.setup
    signal.signal(signal.SIGINT, handler)


def test_setup_refuses_a_folder_that_holds_a_run(tmp_path: Path, start, capsys) -> None:
    (tmp_path / "args.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        start(RunArgs(str(tmp_path)))
    assert f"{tmp_path} already holds a run: pass --resume" in one_line_error(exit_info, capsys)
    with pytest.raises(SystemExit) as exit_info:  # a run killed before its first checkpoint
        start(RunArgs(str(tmp_path), resume=True))
    assert "holds no checkpoint" in one_line_error(exit_info, capsys)
    assert start(RunArgs(str(tmp_path), overwrite=True)) == (torch.device("cpu"), 0, 1)


def test_setup_refuses_a_folder_of_other_files_even_with_overwrite(tmp_path: Path, start, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(SystemExit) as exit_info:
            start(RunArgs(str(tmp_path), overwrite=overwrite))
        assert "holds files that are not a run" in one_line_error(exit_info, capsys)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "notes.txt").unlink()
    (tmp_path / ".hidden").write_text("")  # hidden files (.nfs, .DS_Store) do not count
    start(RunArgs(str(tmp_path)))


def test_setup_refuses_an_output_dir_it_cannot_make(tmp_path: Path, start, capsys) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        start(RunArgs(str(tmp_path / "file" / "run")))
    assert f"cannot write to --output_dir {tmp_path / 'file' / 'run'}" in one_line_error(exit_info, capsys)


def test_setup_checks_the_device_and_seeds_each_rank_apart(tmp_path: Path, start, capsys, monkeypatch) -> None:
    with pytest.raises(SystemExit) as exit_info:
        start(RunArgs(str(tmp_path / "run"), device="tpu"))
    assert "--device tpu" in one_line_error(exit_info, capsys)
    start(RunArgs(str(tmp_path / "run"), seed=5))
    assert torch.initial_seed() == 5
    monkeypatch.setenv("RANK", "2")  # N+ detail: every rank its own stream, seed + rank * 100003
    start(RunArgs(str(tmp_path / "run"), seed=5))
    assert torch.initial_seed() == 5 + 2 * 100003


def train_step(model, optimizer, scheduler) -> float:
    loss = model(torch.randn(4, 3)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def rng_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def assert_same_rngs(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert a[2][0] == b[2][0] and np.array_equal(a[2][1], b[2][1]) and a[2][2:] == b[2][2:]


def new_state(seed: int) -> dict:
    """A model, its AdamW and a LambdaLR schedule, as a script's Run holds them."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return {"model": model, "optimizer": optimizer,
            "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)}


def test_run_save_and_resume_bring_back_states_rngs_loop_values_and_metrics(tmp_path: Path, start) -> None:
    args = RunArgs(str(tmp_path / "run"))
    start(args)
    state = new_state(0)
    run = common.Run(args, state)
    assert run.resumed is None
    loop_rng = random.Random(7)
    for step in (1, 2):
        run.log({"loss": train_step(**state), "episode": 4 * step}, step)
    loop_rng.random()
    run.save(2, rng=loop_rng, order=[3, 1, 2])
    saved = {name: copy.deepcopy(obj.state_dict()) for name, obj in state.items()}
    saved_rngs, saved_loop_rng = rng_states(), loop_rng.getstate()
    metrics_at_save = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in metrics_at_save.splitlines()] == [1, 2]
    run.log({"loss": train_step(**state)}, 3)  # logged after the checkpoint, then the run is killed
    random.random(), np.random.rand(), loop_rng.random()

    args = RunArgs(str(tmp_path / "run"), resume=True)
    start(args)
    state = new_state(1)  # fresh objects, as a restarted script builds them
    run = common.Run(args, state)
    for name, obj in state.items():
        assert_equal_states(obj.state_dict(), saved[name])
    assert_same_rngs(rng_states(), saved_rngs)
    assert run.resumed["step"] == 2 and run.resumed["order"] == [3, 1, 2]
    assert run.resumed["rng"].getstate() == saved_loop_rng
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics_at_save  # step 3's line is gone
    run.log({"loss": train_step(**state)}, 3)
    assert [json.loads(line)["step"]
            for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def assert_equal_states(a, b) -> None:
    """Nested state dicts (tensors, numbers, lists, dicts) equal exactly."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_equal_states(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_states(x, y)
    elif not callable(a):
        assert a == b


def test_a_checkpoint_written_before_any_log_of_a_resumed_run_keeps_metrics_whole(tmp_path: Path, start) -> None:
    args = RunArgs(str(tmp_path / "run"))
    start(args)
    run = common.Run(args, new_state(0))
    run.log({"loss": 1.0}, 1)
    run.save(1)
    run.log({"loss": 2.0}, 2)
    common.Run(RunArgs(args.output_dir, resume=True), new_state(0)).save(2)  # sft.py: --save_every below --eval_every
    run = common.Run(RunArgs(args.output_dir, resume=True), new_state(0))
    run.log({"loss": 3.0}, 3)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 3]


def test_check_finite_stops_with_exit_1_and_names_the_checkpoint(tmp_path: Path, start, capsys) -> None:
    args = RunArgs(str(tmp_path / "run"))
    start(args)
    run = common.Run(args, new_state(0))
    run.check_finite(1, loss=torch.tensor(0.5), grad_norm=torch.tensor(3.0))
    with pytest.raises(SystemExit) as exit_info:
        run.check_finite(2, loss=torch.tensor(0.5), grad_norm=torch.tensor(float("inf")))
    err = one_line_error(exit_info, capsys, code=1)
    assert err.startswith("error: step 2: grad_norm is inf: training diverged") and "no checkpoint was written" in err
    run.save(2)
    with pytest.raises(SystemExit) as exit_info:
        run.check_finite(3, loss=torch.tensor([0.1, float("nan")]))
    assert f"the last good checkpoint is {run.checkpoint}" in one_line_error(exit_info, capsys, code=1)


def test_run_finish_saves_the_model_samples_and_summary_last(tok, tmp_path: Path, start) -> None:
    args = RunArgs(str(tmp_path / "run"))
    start(args)
    model = tiny_lm("gpt2", tok)
    common.Run(args, {"model": model}).save(1)
    (tmp_path / "run" / ".saving").mkdir()  # a model save cut short by a kill: cleared on resume
    args = RunArgs(args.output_dir, resume=True)
    run = common.Run(args, {"model": model})
    samples = [{"prompt": "it was", "response": "good .", "score": 1.5}, {"prompt": "i", "response": "", "score": 0.0}]
    run.finish(model, tok, {"reward": 0.75, "initial": {"reward": 0.1}}, samples=samples, initial_samples=samples[:1])
    folder = tmp_path / "run"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["reward"] == 0.75 and summary["initial"] == {"reward": 0.1} and summary["world_size"] == 1
    assert summary["peak_memory_mb"] > 0 and summary["wall_time"] >= 0
    assert [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()] == samples
    assert [json.loads(line) for line in (folder / "initial_samples.jsonl").read_text().splitlines()] == samples[:1]
    assert json.loads((folder / "args.json").read_text()) == asdict(args) | {"world_size": 1, "derived": {}}
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert common.load_tokenizer(str(folder)).get_vocab() == tok.get_vocab()
    assert not (folder / ".saving").exists()


def test_run_finish_refuses_a_model_with_non_finite_weights(tok, tmp_path: Path, start, capsys) -> None:
    args = RunArgs(str(tmp_path / "run"))
    start(args)
    model = tiny_lm("gpt2", tok)
    run = common.Run(args, {"model": model})
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(SystemExit) as exit_info:
        run.finish(model, tok, {"reward": 1.0}, samples=[])
    assert "step final: parameter" in one_line_error(exit_info, capsys, code=1)
    assert not any((tmp_path / "run" / f).exists() for f in ("summary.json", "model.safetensors", "samples.jsonl"))


def test_a_model_save_cut_short_leaves_no_model_and_no_summary(tok, tmp_path: Path, start, monkeypatch) -> None:
    args = RunArgs(str(tmp_path / "run"))
    start(args)
    model = tiny_lm("gpt2", tok)
    run = common.Run(args, {"model": model})

    def crash_midway(directory, *args, **kwargs) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        run.finish(model, tok, {"reward": 1.0})
    folder = tmp_path / "run"
    assert not (folder / "model.safetensors").exists() and not (folder / "summary.json").exists()
