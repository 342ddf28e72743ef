"""Chat templates and TRL's implicit prompts: conversational data is tokenized as the template renders it (one
<bos>, each reply ending with the template's end-of-turn token), generation stops at that token as well as at EOS,
and preference rows without a prompt column find the prompt their two answers share."""

import json
import random
import string
from pathlib import Path

import pytest
import torch
from conftest import run_script
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

import common

STYLES = {
    # Llama 3: byte-level BPE; both the tokenizer and the template put <|begin_of_text|> first; turns end <|eot_id|>
    "llama3": {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"], "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "end": "<|eot_id|>",
               "template": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                           "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"},
    # Gemma: <bos> from both; a turn ends with <end_of_turn> and a newline
    "gemma": {"specials": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "bos": "<bos>",
              "eos": "<eos>", "pad": "<pad>", "end": "<end_of_turn>",
              "template": "{{ bos_token }}{% for m in messages %}<start_of_turn>"
                          "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                          "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"},
    # Qwen (ChatML): no <bos>; EOS <|endoftext|> (the pad as well) differs from the end of turn, <|im_end|>
    "chatml": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos": "<|endoftext|>", "end": "<|im_end|>",
               "template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"},
    # Mistral: SentencePiece-style (a word's first piece carries a space mark); <s> from both; the reply follows
    # [/INST] without a space and ends with EOS
    "mistral": {"specials": ["<unk>", "<s>", "</s>"], "bos": "<s>", "eos": "</s>", "unk": "<unk>", "end": "</s>",
                "template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                            "[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
                            "{% endfor %}"},
}
USER = {"role": "user", "content": "how was the movie ?"}


def reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


def chat_tokenizer(style: str, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained in a moment on toy reviews, with the special tokens and chat template of `style`."""
    s = STYLES[style]
    sentencepiece = style == "mistral"
    backend = Tokenizer(models.BPE(unk_token=s.get("unk")))
    backend.pre_tokenizer = (pre_tokenizers.Metaspace() if sentencepiece
                             else pre_tokenizers.ByteLevel(add_prefix_space=False))
    backend.decoder = decoders.Metaspace() if sentencepiece else decoders.ByteLevel()
    rng = random.Random(0)
    corpus = [" ".join(common.sample_review(rng)) for _ in range(300)] + ["[INST] how was the movie ? [/INST]"] * 20
    alphabet = list(string.printable) + ["▁"] if sentencepiece else pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=s["specials"],
                                                            initial_alphabet=alphabet))
    if "bos" in s:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{s['bos']} $A", special_tokens=[(s["bos"], backend.token_to_id(s["bos"]))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend,
                                        **{f"{k}_token": s[k] for k in ("bos", "eos", "pad", "unk") if k in s})
    tokenizer.chat_template = s["template"]
    return tokenizer


def test_stop_ids_follow_a_changed_template() -> None:
    """stop_ids is cached per tokenizer; a template set afterwards (or removed) is still followed."""
    tokenizer = chat_tokenizer("chatml")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert common.stop_ids(tokenizer) == [tokenizer.eos_token_id, end]
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    assert common.stop_ids(tokenizer) == [tokenizer.eos_token_id]
    tokenizer.chat_template = template
    assert common.stop_ids(tokenizer) == [tokenizer.eos_token_id, end]


def template_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """transformers' own tokenization of a conversation through the template (what TRL trains on)."""
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Conversational data: the template's tokens, one <bos>, replies ending with the end of turn.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_conversational_rows_are_the_templates_tokens(style: str) -> None:
    tokenizer = chat_tokenizer(style)
    end = tokenizer.convert_tokens_to_ids(STYLES[style]["end"])
    assert common.stop_ids(tokenizer) == list(dict.fromkeys([tokenizer.eos_token_id, end]))
    conversation = [USER, reply("it was very good ."), {"role": "user", "content": "and the music ?"},
                    reply("i loved the music .")]
    row = common.standardize_row({"messages": conversation}, tokenizer)
    assert row["completion"].endswith(STYLES[style]["end"])  # not the newline Gemma and ChatML render after it
    prompt = common.encode_prompt(tokenizer, row["prompt"])
    completion = common.encode_completion(tokenizer, row["completion"], prompt=row["prompt"])

    # the prompt as transformers renders and tokenizes it (its generation prompt included), with one <bos>
    assert prompt == template_ids(tokenizer, conversation[:-1], generation_prompt=True)
    if tokenizer.bos_token is not None:
        assert prompt.count(tokenizer.bos_token_id) == 1 and prompt[0] == tokenizer.bos_token_id
        assert tokenizer(row["prompt"])["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # the trap: a plain call
    # the reply: the whole conversation's tokens past the prompt's, up to and including the end of turn
    whole = template_ids(tokenizer, conversation)
    assert whole[:len(prompt) + len(completion)] == prompt + completion
    assert completion[-1] == end and completion.count(end) == 1 and tokenizer.eos_token_id not in completion[:-1]
    assert tokenizer.decode(whole[len(prompt) + len(completion):]).strip() == ""  # only a newline is left out
    assert completion[:-1] == common.encode_completion(tokenizer, "i loved the music .", add_eos=False,
                                                       prompt=row["prompt"])


def test_a_reply_tokenized_alone_differs_where_sentencepiece_marks_the_first_word() -> None:
    """Why a completion is the difference prompt + completion - prompt (TRL's rule): alone, Mistral's reply would
    start with a word-start mark that the text after "[/INST]" does not have."""
    tokenizer = chat_tokenizer("mistral")
    row = common.standardize_row({"prompt": [USER], "completion": [reply("it was good .")]}, tokenizer)
    assert row["completion"] == "it was good .</s>"
    in_context = common.encode_completion(tokenizer, row["completion"], prompt=row["prompt"])
    alone = common.encode_completion(tokenizer, row["completion"])
    assert in_context != alone and tokenizer.convert_ids_to_tokens(alone)[0].startswith("▁")
    assert (template_ids(tokenizer, [USER, reply("it was good .")])
            == common.encode_prompt(tokenizer, row["prompt"]) + in_context)


def test_text_rows_keep_eos_and_pretemplated_text_gets_no_second_bos() -> None:
    tokenizer = chat_tokenizer("llama3")
    assert common.encode_completion(tokenizer, " it was good .", prompt="how was it ?")[-1] == tokenizer.eos_token_id
    text = "<|begin_of_text|>how was it ?"  # a dataset rendered beforehand
    assert common.encode_prompt(tokenizer, text).count(tokenizer.bos_token_id) == 1
    assert common.encode_prompt(tokenizer, "how was it ?")[0] == tokenizer.bos_token_id


# ---------------------------------------------------------------------------------------------
# Generation stops at the end of turn as well as at EOS; the stop token is cut, counted and read the same way.
# ---------------------------------------------------------------------------------------------


def tiny_lm(tokenizer, **config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **config)).eval()


def boost(model, token_id: int, logit: float) -> None:
    """Add `logit` to one token's logit at every step (a model that has learned to end its turns)."""
    model.lm_head.register_forward_hook(
        lambda module, inputs, out: out + logit * torch.nn.functional.one_hot(torch.tensor(token_id), out.shape[-1]))


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_generation_stops_at_the_end_of_turn(style: str) -> None:
    tokenizer = chat_tokenizer(style)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # what load_tokenizer does
    end = tokenizer.convert_tokens_to_ids(STYLES[style]["end"])
    model = tiny_lm(tokenizer)
    boost(model, end, 4.0)
    prompts = [common.standardize_row({"prompt": [{"role": "user", "content": c}]}, tokenizer)["prompt"]
               for c in ("how was the movie ?", "the plot", "i loved it .", "and the music ?")] * 4
    queries, query_mask = common.pad([common.encode_prompt(tokenizer, p) for p in prompts],
                                     tokenizer.pad_token_id, "left")
    torch.manual_seed(0)
    max_new_tokens = 64
    responses, response_mask, ended, _ = common.generate(model, queries, query_mask, tokenizer, max_new_tokens)
    assert ended.all() and responses.shape[1] < max_new_tokens  # every row stopped, and sampling stopped with them
    stops = set(common.stop_ids(tokenizer))
    for row, mask in zip(responses.tolist(), response_mask.tolist()):
        n = next(i for i, t in enumerate(row) if t in stops) + 1  # up to and including the first stop token
        assert mask == [1] * n + [0] * (len(row) - n) and all(t == tokenizer.pad_token_id for t in row[n:])
    last = responses.gather(1, response_mask.sum(-1, keepdim=True) - 1).squeeze(1)
    assert (last == end).any()  # the end of turn, not EOS, ended some rows
    assert common.response_length(responses, response_mask, common.stop_ids(tokenizer)).tolist() == (
        response_mask.sum(-1) - 1).tolist()
    texts = common.decode_responses(tokenizer, responses, response_mask)
    assert not any(STYLES[style]["end"] in t or tokenizer.eos_token in t for t in texts)


def test_the_generation_configs_eos_ids_stop_too(tmp_path: Path) -> None:
    """A model may list several EOS ids in its generation config (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>):
    a tokenizer loaded from its folder stops at each."""
    tokenizer = chat_tokenizer("llama3")
    extra = tokenizer.convert_tokens_to_ids("<|start_header_id|>")  # any token stands in for <|eom_id|>
    model = tiny_lm(tokenizer)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra]
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = common.load_tokenizer(str(tmp_path))
    assert set(common.stop_ids(loaded)) == {tokenizer.eos_token_id, extra,
                                            tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    responses = torch.tensor([[7, extra, 9, 9], [7, 8, 9, 10]])
    mask, ended = common.truncate_after_eos(responses, common.stop_ids(loaded))
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ended.tolist() == [True, False]


@pytest.mark.parametrize("rm_style", ["chatml", "words"])
def test_retokenize_ends_an_ended_response_with_the_other_tokenizers_stop_token(rm_style: str) -> None:
    """For a reward model with another vocabulary: the end of turn of the same name where it has one (a shared
    template), else its EOS; a response cut at the length limit gets none. Against the text tokenized directly."""
    policy = chat_tokenizer("chatml")
    policy.pad_token = policy.eos_token
    if rm_style == "chatml":
        rm = chat_tokenizer("chatml", vocab_size=350)
        rm_end = "<|im_end|>"
    else:
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", *common.TOY_WORDS])},
                                             "<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        rm, rm_end = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>"), "</s>"
    rm.pad_token = rm.eos_token
    assert rm.get_vocab() != policy.get_vocab()
    replies = ["it was good .", "i loved it . the music was nice .", "it was bad ."]
    prompts = ([common.standardize_row({"prompt": [USER]}, policy)["prompt"]] * 3 if rm_style == "chatml"
               else ["it was"] * 3)
    completions = [common.encode_completion(policy, f" {r}<|im_end|>", prompt=p) for p, r in zip(prompts, replies)]
    completions[1] = completions[1][:-3]  # cut at the length limit, without its end of turn
    responses, _ = common.pad(completions, policy.pad_token_id)
    response_mask, _ = common.truncate_after_eos(responses, common.stop_ids(policy))
    ids, mask = common.retokenize(prompts, responses, response_mask, policy, rm)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        text = policy.decode(completion, skip_special_tokens=True)
        expected = rm(prompt + text + (rm_end if i != 1 else ""))["input_ids"]
        assert ids[i][mask[i] == 1].tolist() == expected


# ---------------------------------------------------------------------------------------------
# TRL's implicit prompt: preference rows of chosen and rejected alone.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, expected", [
    # text: the longest common prefix; the space before the answers goes with them
    ({"chosen": "Review: the plot was very good .", "rejected": "Review: the plot was very bad ."},
     {"prompt": "Review: the plot was very", "chosen": " good .", "rejected": " bad ."}),
    # HH-RLHF: up to the last "\n\nAssistant:", even when both answers start alike
    ({"chosen": "\n\nHuman: and the music?\n\nAssistant: I think it was good.",
      "rejected": "\n\nHuman: and the music?\n\nAssistant: I think not."},
     {"prompt": "\n\nHuman: and the music?\n\nAssistant:", "chosen": " I think it was good.",
      "rejected": " I think not."}),
    ({"chosen": "the plot was good", "rejected": "it was bad"}, {"prompt": "", "chosen": "the plot was good",
                                                                  "rejected": "it was bad"}),
])
def test_implicit_prompt_of_text_rows(row: dict, expected: dict) -> None:
    standardized = common.standardize_row(row, common.toy_tokenizer())
    assert {k: standardized[k] for k in expected} == expected and standardized["completion"] == expected["chosen"]


def test_implicit_prompt_of_conversational_rows_through_load_data(tmp_path: Path, capsys) -> None:
    tokenizer = chat_tokenizer("llama3")
    rows = [{"chosen": [USER, reply("it was good .")], "rejected": [USER, reply("it was bad .")]}] * 4
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _ = common.load_data(str(path), "preference", tokenizer, test_rows=1)
    assert train[0]["prompt"] == tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert (train[0]["chosen"], train[0]["rejected"]) == ("it was good .<|eot_id|>", "it was bad .<|eot_id|>")

    # answers to different conversations share no prompt: a one-line error naming the columns
    rows = [{"chosen": [USER, reply("it was good .")],
             "rejected": [{"role": "user", "content": "hi"}, reply("hi .")]}] * 4
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit) as exit_info:
        common.load_data(str(path), "preference", tokenizer, test_rows=1)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "['chosen', 'rejected']" in err


# ---------------------------------------------------------------------------------------------
# End to end: a reward model from a chat model without a pad token, on conversational pairs.
# ---------------------------------------------------------------------------------------------


def test_reward_model_on_chat_pairs_scores_the_same_under_plain_transformers(tmp_path: Path) -> None:
    """reward_model.py on implicit-prompt conversations with a Llama-3-style tokenizer (pad == EOS) and a tiny Llama:
    the saved model gives, under AutoModelForSequenceClassification + AutoTokenizer, our scores, read at <|eot_id|>."""
    tokenizer = chat_tokenizer("llama3")
    tokenizer.save_pretrained(tmp_path / "sft")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)).save_pretrained(tmp_path / "sft")
    pairs = common.toy_dataset("preference")["train"].select(range(48))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"chosen": [{"role": "user", "content": r["prompt"]}, reply(r["chosen"])],
                                        "rejected": [{"role": "user", "content": r["prompt"]}, reply(r["rejected"])]})
                            + "\n" for r in pairs))
    out = tmp_path / "rm"
    run_script("reward_model.py", "--model_name_or_path", str(tmp_path / "sft"), "--dataset_name", str(path),
               "--output_dir", str(out), "--batch_size", "8", "--eval_rows", "8", "--demo_rows", "8",
               "--num_epochs", "1", "--max_length", "128")
    assert json.loads((out / "summary.json").read_text())["centered"] is False  # an RMSNorm model keeps its offset

    rows = [common.standardize_row({"chosen": [{"role": "user", "content": r["prompt"]}, reply(r["chosen"])],
                                    "rejected": [{"role": "user", "content": r["prompt"]}, reply(r["rejected"])]},
                                   tokenizer) for r in pairs.select(range(6))]
    rm_tokenizer = common.load_tokenizer(str(out))
    ids, mask = common.pad([common.encode_prompt(rm_tokenizer, r["prompt"]) +
                            common.encode_completion(rm_tokenizer, r["chosen"], prompt=r["prompt"]) for r in rows],
                           rm_tokenizer.pad_token_id)
    assert (ids.gather(1, mask.sum(-1, keepdim=True) - 1) == tokenizer.convert_tokens_to_ids("<|eot_id|>")).all()
    with torch.no_grad():
        ours = common.last_token_scores(common.TokenScores(common.load_model(str(out), rm_tokenizer, "score")),
                                        ids, mask)
        plain_tokenizer = AutoTokenizer.from_pretrained(out)
        batch = plain_tokenizer([r["prompt"] + r["chosen"] for r in rows], padding=True, return_tensors="pt",
                                add_special_tokens=False)  # the rendered text carries its <bos>
        plain = AutoModelForSequenceClassification.from_pretrained(out)(**batch).logits[:, 0]
    assert torch.equal(batch["input_ids"], ids)
    torch.testing.assert_close(plain, ours, atol=1e-5, rtol=0)
