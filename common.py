"""Shared utilities for minrlhf: the toy world, loading, batching, log-probs, generation, logging.

Each algorithm file (sft.py, reward_model.py, ppo.py, ...) holds its own training loop and math;
this module holds only what several of them need and that is not the algorithm itself.
"""

import functools
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

if not sys.stderr.isatty():  # as `progress`: no progress bars in logs, so one-line errors stay one line
    transformers.utils.logging.disable_progress_bar()
    import datasets
    datasets.disable_progress_bars()

TOY = "toy"
_START = time.time()  # the script's wall time, reported in summary.json

# ---------------------------------------------------------------------------------------------
# The toy world: a word-level grammar of movie reviews with a known gold reward.
# ---------------------------------------------------------------------------------------------

NOUNS = ("movie film plot story acting cast ending music script dialogue pacing soundtrack "
         "director camera humor villain hero scenery costumes effects sequel finale characters editing "
         "writing lighting").split()
ADJECTIVES = {  # valence of each adjective, -2 .. +2
    **dict.fromkeys("great amazing wonderful brilliant superb excellent fantastic beautiful stunning".split(), 2.0),
    **dict.fromkeys("good fun nice charming solid clever enjoyable pleasant".split(), 1.0),
    **dict.fromkeys("okay fine average ordinary predictable long short".split(), 0.0),
    **dict.fromkeys("bad poor boring slow weak bland silly dull messy mediocre confusing".split(), -1.0),
    **dict.fromkeys("awful terrible horrible dreadful painful".split(), -2.0),
}
VERBS = {  # past tense -> (base form, valence)
    "loved": ("love", 2.0), "adored": ("adore", 2.0), "liked": ("like", 1.0),
    "enjoyed": ("enjoy", 1.0), "watched": ("watch", 0.0), "disliked": ("dislike", -1.0),
    "hated": ("hate", -2.0), "regretted": ("regret", -2.0),
}
INTENSIFIERS = {"very": 1.5, "really": 1.5, "truly": 1.5, "extremely": 2.0, "quite": 1.2,
                "somewhat": 0.5, "slightly": 0.5}
ADVERBS = {"really": 1.5, "truly": 1.5, "honestly": 1.0, "mostly": 0.5}
VALENCE = {**ADJECTIVES, **{past: v for past, (_, v) in VERBS.items()},
           **{base: v for base, v in VERBS.values()}}
MULTIPLIER = {**INTENSIFIERS, **ADVERBS}
NEGATION = -0.5  # "not great" is mildly negative, "not bad" mildly positive

# A sentence form is a list of slots; a slot is a word or a tuple of choices ("" = skip it).
_ADJ_PHRASE = [("", "", "not"), ("", "") + tuple(INTENSIFIERS), tuple(ADJECTIVES), "."]
SENTENCE_FORMS = [
    ["the", tuple(NOUNS), "was", *_ADJ_PHRASE],
    ["it", "was", *_ADJ_PHRASE],
]
for _object in (["it"], ["the", tuple(NOUNS)]):
    SENTENCE_FORMS += [["i", ("", "", "") + tuple(ADVERBS), tuple(VERBS), *_object, "."],
                       ["i", "did", "not", tuple(b for b, _ in VERBS.values()), *_object, "."]]
TOY_WORDS = sorted({w for form in SENTENCE_FORMS for slot in form
                    for w in ((slot,) if isinstance(slot, str) else slot) if w})
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


def _sample_sentence(rng: random.Random, prefix: list[str]) -> list[str] | None:
    """Sample one sentence whose first words are `prefix` (None if the chosen form cannot match)."""
    words = []
    for slot in rng.choice(SENTENCE_FORMS):
        choices = (slot,) if isinstance(slot, str) else slot
        if len(words) < len(prefix):  # forced: keep the prefix's word, or skip an optional slot
            want = prefix[len(words)]
            choices = (want,) if want in choices else tuple(c for c in choices if c == "")
            if not choices:
                return None
        words += [w] if (w := rng.choice(choices)) else []
    return words if words[:len(prefix)] == prefix else None  # a skipped slot can miss the prefix


def sample_review(rng: random.Random, prefix: list[str] = ()) -> list[str]:
    """A review of 1-6 grammatical sentences (a list of words) that starts with `prefix`."""
    while (first := _sample_sentence(rng, list(prefix))) is None:
        pass
    words = first
    for _ in range(rng.randint(0, 5)):
        while (sentence := _sample_sentence(rng, [])) is None:
            pass
        words += sentence
    return words


def _match(words: list[str], form: list) -> bool:
    if not form:
        return not words
    slot, rest = form[0], form[1:]
    choices = (slot,) if isinstance(slot, str) else slot
    return any(_match(words, rest) if c == "" else (words[:1] == [c] and _match(words[1:], rest))
               for c in set(choices))


def _parse_sentence(words: list[str]) -> float | None:
    """Valence of a sentence (list of words ending in "."), or None if it is not grammatical."""
    if not any(_match(words, form) for form in SENTENCE_FORMS):
        return None
    value = next(VALENCE[w] for w in words if w in VALENCE)
    for w in words:
        value *= MULTIPLIER.get(w, 1.0) * (NEGATION if w == "not" else 1.0)
    return value


def split_sentences(text: str) -> list[list[str]]:
    """Split text into sentences at "."; a trailing fragment without "." is its own sentence."""
    sentences, current = [], []
    for w in text.split():
        current.append(w)
        if w == ".":
            sentences.append(current)
            current = []
    return sentences + ([current] if current else [])


def gold_reward(prompt: str, completion: str) -> float:
    """The toy world's true reward of a review: the mean valence of its well-formed, distinct
    sentences, minus 2 per malformed sentence and 1 per repeated sentence."""
    seen, valences, penalty = set(), [], 0.0
    for sentence in split_sentences(f"{prompt} {completion}"):
        value = _parse_sentence(sentence)
        if value is None:
            penalty += 2.0
        elif tuple(sentence) in seen:
            penalty += 1.0
        else:
            seen.add(tuple(sentence))
            valences.append(value)
    return (sum(valences) / len(valences) if valences else 0.0) - penalty


def well_formed(prompt: str, completion: str) -> float:
    """Fraction of the review's sentences that are grammatical (0 for an empty review)."""
    sentences = split_sentences(f"{prompt} {completion}")
    return sum(_parse_sentence(s) is not None for s in sentences) / max(len(sentences), 1)


def length_reward(n_tokens: torch.Tensor, target: int) -> torch.Tensor:
    """Golden length reward 1 - |n/N - 1| (Fan et al. 2023; Singhal et al. 2023's LPPO)."""
    return 1.0 - (n_tokens.float() / target - 1.0).abs()


def toy_tokenizer():
    """Word-level tokenizer over the toy vocabulary, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([PAD, BOS, EOS, UNK] + TOY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=UNK, padding_side="left")


def toy_model(tokenizer, kind: str = "causal"):
    """A ~0.8M-parameter GPT-2 over the toy vocabulary, randomly initialized, dropout off: a causal
    LM, or with kind="score" a scalar-head classifier. The initialization depends only on the seed
    set by seed_everything, so two toy models of one run (say, a policy and its reference) are equal."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config

    # activation "gelu" (one fused op) rather than GPT-2's "gelu_new" (a tanh formula of eight ops):
    # about 20% less time per forward and backward pass on a CPU, same quality
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_layer=4,
                        n_head=4, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, num_labels=1)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    with torch.random.fork_rng():
        torch.manual_seed(torch.initial_seed())
        return cls.from_config(config)


@functools.cache
def toy_dataset(kind: str, seed: int = 0, n_train: int = 4000, n_test: int = 256, k: float = 2.0, c: float = 0.1):
    """Deterministic toy datasets in TRL's standard formats.

    kind="sft" and "prompts": prompt (first 2-4 words of a review) and completion (the rest).
    kind="preference": prompt, chosen, rejected: two reviews for one prompt, labeled by a simulated
    annotator with P(a > b) = sigmoid(k (gold_a - gold_b) + c (len_a - len_b)): noisy (k), and
    slightly preferring longer reviews (c), as real preference data does. Also `gold_chosen_better`."""
    from datasets import Dataset, DatasetDict

    rng = random.Random(f"{kind}-{seed}")
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for _ in range(n):
            a = sample_review(rng)
            cut = rng.randint(2, min(4, len(a) - 1))
            prompt, a = a[:cut], a[cut:]
            row = {"prompt": " ".join(prompt), "completion": " ".join(a)}
            if kind == "preference":
                b = sample_review(rng, prompt)[cut:]
                ga, gb = gold_reward(row["prompt"], " ".join(a)), gold_reward(row["prompt"], " ".join(b))
                # clipped so that exp() cannot overflow for a large k (no effect at the defaults)
                logit = max(-50.0, min(50.0, k * (ga - gb) + c * (len(a) - len(b))))
                p_a = 1 / (1 + math.exp(-logit))
                chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
                row = {"prompt": row["prompt"], "chosen": " ".join(chosen),
                       "rejected": " ".join(rejected), "gold_chosen_better": (ga >= gb) == (chosen is a)}
            rows.append(row)
        splits[split] = Dataset.from_list(rows)
    return DatasetDict(splits)


# ---------------------------------------------------------------------------------------------
# Loading models, tokenizers and datasets.
# ---------------------------------------------------------------------------------------------


def fail(message: str) -> NoReturn:
    """Exit with a one-line error (status 2, no traceback): for bad input the user can fix."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def require_positive(args, *names: str) -> None:
    """fail() unless each named argument is positive: a zero batch size, epoch count or interval
    would otherwise surface as a ZeroDivisionError deep inside the loop."""
    for name in names:
        if getattr(args, name) <= 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")


def decode_responses(tokenizer, responses: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Text of each response (B, R) up to its EOS, EOS excluded. Other special tokens stay visible
    (for example `<pad>` sampled mid-response), so that the toy gold reward sees them as malformed."""
    keep = (response_mask == 1) & (responses != tokenizer.eos_token_id)
    return [tokenizer.decode(row[k].tolist()) for row, k in zip(responses, keep)]


def _check_exists(name_or_path: str, hint: str) -> None:
    """Fail early on a local path that does not exist; anything else may be a hub id."""
    if os.path.exists(os.path.expanduser(name_or_path)):
        return
    if name_or_path.startswith((".", "/", "~", "runs/")) or name_or_path.count("/") > 1:  # hub ids: "gpt2", "org/name"
        fail(f"{name_or_path} not found: {hint}")


def load_tokenizer(name_or_path: str, hint: str = "check the path or hub id"):
    """Tokenizer for `toy`, a hub id or a local directory, with a pad token and left padding."""
    if name_or_path == TOY:
        return toy_tokenizer()
    from transformers import AutoTokenizer

    _check_exists(name_or_path, hint)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        fail(f"cannot load a tokenizer from {name_or_path} ({str(e).splitlines()[0]}): {hint}")
    if tokenizer.pad_token is None:  # e.g. GPT-2, Pythia: we always mask, so EOS can double as pad
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name_or_path: str, tokenizer, kind: str = "causal", hint: str = "check the path or hub id"):
    """A causal LM (kind="causal") or a scalar-head sequence classifier (kind="score").

    `toy` builds a fresh toy model. A "score" model loaded from a causal LM gets a new head, which
    we zero-initialize so that its first outputs are 0 (N+ detail for a fresh value model)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if name_or_path == TOY:
        model = toy_model(tokenizer, kind)
        if kind == "score":
            torch.nn.init.zeros_(model.score.weight)
        return model
    _check_exists(name_or_path, hint)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = {} if kind == "causal" else {"num_labels": 1}
    verbosity = transformers.utils.logging.get_verbosity()
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        new_head = kind == "score" and not any("Classification" in a for a in config.architectures or [])
        if new_head:  # the "score.weight missing" load report is expected here: keep stderr quiet
            transformers.utils.logging.set_verbosity_error()
        model = cls.from_pretrained(name_or_path, **extra)
    except (OSError, ValueError) as e:
        fail(f"cannot load a model from {name_or_path} ({str(e).splitlines()[0]}): {hint}")
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    if new_head:
        torch.nn.init.zeros_(model.score.weight)
        if getattr(model.score, "bias", None) is not None:
            torch.nn.init.zeros_(model.score.bias)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (N+ detail: dropout makes PPO's ratios noisy): the
    nn.Dropout modules, and the plain float that attention layers of Llama, Qwen or Mistral keep."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


HH_ASSISTANT = "\n\nAssistant:"


def _text(value, tokenizer, generation_prompt: bool = False) -> str:
    """A string as is; a conversational list of messages through the chat template (or joined)."""
    if isinstance(value, str):
        return value
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=generation_prompt)
    return "".join(f"\n\n{m['role'].capitalize()}: {m['content']}" for m in value) + (
        HH_ASSISTANT if generation_prompt else "")


def standardize_row(row: dict, tokenizer) -> dict:
    """Map one row of any accepted format to {"prompt", "completion", "chosen", "rejected"} strings
    (missing parts None). Accepted: TRL prompt-only, prompt/completion, preference with explicit or
    implicit prompt (standard or conversational `messages`), HH-RLHF raw transcripts, RRHF rows."""
    if "query" in row and "responses" in row:  # RRHF: best and worst response by score
        order = sorted(range(len(row["responses"])), key=lambda i: row["scores"][i])
        return {"prompt": row["query"], "completion": row["responses"][order[-1]],
                "chosen": row["responses"][order[-1]], "rejected": row["responses"][order[0]]}
    if "messages" in row:  # conversational SFT: the last assistant turn is the completion
        msgs = row["messages"]
        return {"prompt": _text(msgs[:-1], tokenizer, True), "completion": msgs[-1]["content"],
                "chosen": None, "rejected": None}
    if "chosen" in row and "rejected" in row:
        chosen, rejected = row["chosen"], row["rejected"]
        if row.get("prompt") is not None:
            prompt = _text(row["prompt"], tokenizer, True)
            chosen = chosen if isinstance(chosen, str) else chosen[-1]["content"]
            rejected = rejected if isinstance(rejected, str) else rejected[-1]["content"]
        elif isinstance(chosen, str):  # implicit prompt: HH-RLHF raw transcripts
            cut = chosen.rfind(HH_ASSISTANT)
            if cut < 0:
                raise ValueError("implicit-prompt preference rows need a shared prefix ending in '\\n\\nAssistant:'")
            cut += len(HH_ASSISTANT)
            prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
        else:  # implicit prompt, conversational
            prompt = _text(chosen[:-1], tokenizer, True)
            chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
        return {"prompt": prompt, "completion": chosen, "chosen": chosen, "rejected": rejected,
                **({"margin": row["margin"]} if "margin" in row else {})}
    if "prompt" in row:
        completion = row.get("completion")
        if completion is not None and not isinstance(completion, str):
            completion = completion[-1]["content"]
        return {"prompt": _text(row["prompt"], tokenizer, True), "completion": completion,
                "chosen": None, "rejected": None}
    raise ValueError("unknown format")


FORMATS = ("prompt", "prompt/completion", "prompt/chosen/rejected", "chosen/rejected (HH-RLHF)",
           "messages", "query/responses/scores (RRHF)")
NEEDS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
         "prompts": ("prompt",)}


def _load_splits(name: str, config: str | None):
    """A DatasetDict from `toy`-less sources: a save_to_disk folder, a data file, or the hub."""
    import datasets

    if os.path.isdir(name):
        loaded = datasets.load_from_disk(name)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    if name.endswith((".json", ".jsonl", ".parquet")):
        if not os.path.exists(name):
            fail(f"dataset file {name} not found")
        return datasets.load_dataset("parquet" if name.endswith(".parquet") else "json", data_files=name)
    return datasets.load_dataset(name, config)


def load_data(name: str, stage: str, tokenizer, config: str | None = None, train_split: str = "train",
              test_split: str = "test", test_rows: int = 256, max_train_rows: int | None = None):
    """Load train and test rows standardized for a stage: "sft" (prompt, completion), "preference"
    (prompt, chosen, rejected[, margin]) or "prompts" (prompt[, completion]).

    `name` is `toy`, a hub id, a .json/.jsonl/.parquet file or a `save_to_disk` folder. Without a
    test split, the last `test_rows` rows of the train split (at most half of it) are held out."""
    try:
        splits = toy_dataset(stage) if name == TOY else _load_splits(name, config)
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(f"cannot load dataset {name} ({str(e).splitlines()[0]})")
    if train_split not in splits:
        fail(f"dataset {name} has no split {train_split!r} (it has {list(splits)}): pass --dataset_train_split")
    train = splits[train_split]
    if test_split in splits:
        test = splits[test_split]
    else:  # hold out the last rows, at most half of a small dataset
        held_out = min(test_rows, len(train) // 2)
        if held_out == 0:
            fail(f"dataset {name} has {len(train)} rows in {train_split!r}: too few to hold some out for evaluation")
        test, train = train.select(range(len(train) - held_out, len(train))), train.select(range(len(train) - held_out))
    test = test.select(range(min(test_rows, len(test))))
    if max_train_rows is not None:
        train = train.select(range(min(max_train_rows, len(train))))
    return _standardize(train, name, stage, tokenizer), _standardize(test, name, stage, tokenizer)


def _standardize(dataset, name: str, stage: str, tokenizer) -> list[dict]:
    columns = dataset.column_names
    try:
        rows = [standardize_row(row, tokenizer) for row in dataset]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        fail(f"dataset {name} has columns {columns}, which fit no accepted format ({e}); "
             f"accepted: {', '.join(FORMATS)}")
    missing = [k for k in NEEDS[stage] if not rows or rows[0][k] is None]
    if missing:
        fail(f"dataset {name} has columns {columns}, but the {stage} stage needs {', '.join(missing)}; "
             f"accepted formats: {', '.join(FORMATS)}")
    return rows


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def encode_completion(tokenizer, completion: str, add_eos: bool = True) -> list[int]:
    # add_special_tokens=False: a completion must not get a second <bos> (SPEC correctness fact)
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


# ---------------------------------------------------------------------------------------------
# Batching, log-probs, generation, scoring.
# ---------------------------------------------------------------------------------------------


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into (batch, max_len) ids and attention mask; "left" for generation."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding. GPT-2 in transformers 5 does not derive them from the
    mask in a plain forward pass; without this, left-padded rows get wrong log-probs."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def forward(model, ids: torch.Tensor, mask: torch.Tensor):
    """Model forward with mask-derived position ids; returns the model output."""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(label) under softmax(logits / temperature). logits (B, T, V), labels (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def response_logprobs(model, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (and logits) of the response part of query+response sequences.

    query_response (B, context_len + R), mask (B, context_len + R) -> logprobs (B, R), logits (B, R, V).
    The logit at position t predicts token t+1, hence the shift by one."""
    logits = forward(model, query_response, mask).logits[:, context_len - 1:-1]
    return logprobs_from_logits(logits, query_response[:, context_len:], temperature), logits


def truncate_after_eos(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, R) of response tokens up to and including the first EOS; and (B,) whether one came."""
    is_eos = responses == eos_id
    ended = is_eos.any(-1)
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).long(), ended


@torch.no_grad()
def generate(model, queries: torch.Tensor, query_mask: torch.Tensor, tokenizer, max_new_tokens: int,
             temperature: float = 1.0, greedy: bool = False):
    """Sample responses for left-padded queries (B, Q), reusing the KV cache.

    Returns responses (B, R) right-padded with pad (R <= max_new_tokens: generation stops once
    every row has ended), response_mask (B, R) up to and including the
    first EOS, ended (B,) bool (an EOS came before the length limit), and the generation's scores
    (B, R, V): the raw logits, from which old log-probs can be read without another forward pass."""
    from transformers import GenerationConfig

    # Sample from softmax(logits / T) and nothing else: a hub model's own generation config may add
    # a repetition penalty, banned n-grams or suppressed tokens, and samples from that distribution
    # would not match the log-probs we compute. So generate() gets a config with only our settings.
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, **sampling)
    saved, model.generation_config = model.generation_config, config
    try:
        out = model.generate(input_ids=queries, attention_mask=query_mask, return_dict_in_generate=True,
                             output_logits=True)
    finally:
        model.generation_config = saved
    responses = out.sequences[:, queries.shape[1]:]
    response_mask, ended = truncate_after_eos(responses, tokenizer.eos_token_id)
    responses = responses.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return responses, response_mask, ended, torch.stack(out.logits, 1)


def token_scores(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar head output at every position of a sequence-classification model (a reward or value
    model). ids, mask (B, T) -> (B, T). We skip the model's own pooling, which finds the last token
    by searching for the pad id and so breaks when pad == EOS or with left padding."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    return model.score(hidden.last_hidden_state).squeeze(-1).float()


def last_token_scores(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Score of each sequence read at its last real token (EOS), for left or right padding. -> (B,)"""
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # index of the last 1 in each row
    return token_scores(model, ids, mask)[torch.arange(len(ids)), last]


# ---------------------------------------------------------------------------------------------
# Runs: seeding, devices, progress, metric logging, atomic saving.
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU (where bf16 is slower for small models)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def progress(iterable=None, **kwargs):
    """A progress bar on stderr (disabled when stderr is not a terminal, e.g. in tests and logs)."""
    return tqdm(iterable, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


class Logger:
    """One stdout line per logged step, `metrics.jsonl` in the run directory, optional TensorBoard
    (if installed) and Weights & Biases (`--track`)."""

    def __init__(self, output_dir: str, args, track: bool = False, project: str = "minrlhf"):
        self.path = Path(output_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path / "metrics.jsonl", "w")  # noqa: SIM115 (open for the whole run)
        self.start = time.time()
        self.tb = self.wandb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.path / "tb"))
        except ImportError:
            pass
        if track:
            import wandb
            self.wandb = wandb.init(project=project, config=asdict(args), name=self.path.name)

    def log(self, metrics: dict, step: int, quiet: bool = False) -> None:
        metrics = {"step": step, "time": round(time.time() - self.start, 2),
                   **{k: float(v) if isinstance(v, (torch.Tensor, np.floating)) else v
                      for k, v in metrics.items()}}
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if not quiet:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in metrics.items()), flush=True)
        for k, v in metrics.items():
            if self.tb and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.wandb:  # W&B's own step must only increase: ppo_max.py's warmup logs steps below 0
            self.wandb.log(metrics)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically: to a temporary name, then rename over the old file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save_run(output_dir: str, model, tokenizer, args, summary: dict | None = None) -> None:
    """Save model + tokenizer (save_pretrained), args.json and summary.json into output_dir.

    The model goes to a temporary folder that replaces the old files only once fully written, so
    an interrupted save never destroys the previous checkpoint."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    write_json(out / "args.json", asdict(args))
    if summary is not None:
        write_json(out / "summary.json", summary | {"peak_memory_mb": round(peak_memory_mb(), 1),
                                                    "wall_time": round(time.time() - _START, 1)})


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident memory (Linux: KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# RL: rewards for sampled responses, and evaluation of a policy on held-out prompts.
# ---------------------------------------------------------------------------------------------


def make_reward_fn(kind: str, tokenizer, device: torch.device, reward_model_path: str | None = None,
                   target_length: int = 20):
    """A function scoring a batch of responses, for `--reward model|gold|length`:

        reward_fn(prompts, queries, query_mask, responses, response_mask) -> scores (B,)

    prompts: list of B prompt strings; queries, query_mask (B, Q) left-padded; responses (B, R); response_mask
    (B, R) up to and including the first EOS. `model` reads a Bradley-Terry reward model at the
    last real token; if its tokenizer differs from the policy's, the text is decoded and re-encoded
    for it. `gold` is the toy world's gold reward. `length` is 1 - |n/N - 1|, n excluding EOS."""
    if kind == "gold":
        def reward_fn(prompts, queries, query_mask, responses, response_mask):
            texts = decode_responses(tokenizer, responses, response_mask)
            return torch.tensor([gold_reward(p, t) for p, t in zip(prompts, texts)], device=device)
    elif kind == "length":
        def reward_fn(prompts, queries, query_mask, responses, response_mask):
            return length_reward(response_length(responses, response_mask, tokenizer.eos_token_id), target_length)
    elif kind == "model":
        hint = "run `python reward_model.py` first or pass --reward_model_path"
        rm_tokenizer = load_tokenizer(reward_model_path, hint)
        reward_model = load_model(reward_model_path, rm_tokenizer, "score", hint).to(device).eval()
        reward_model.requires_grad_(False)
        same_vocab = rm_tokenizer.get_vocab() == tokenizer.get_vocab()

        @torch.no_grad()
        def reward_fn(prompts, queries, query_mask, responses, response_mask):
            if same_vocab:
                ids = torch.cat([queries, responses], 1)
                mask = torch.cat([query_mask, response_mask], 1)
            else:  # different tokenizers: go through text (TRL refuses this case)
                texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
                ended = ((responses == tokenizer.eos_token_id) & (response_mask == 1)).any(-1).tolist()
                seqs = [encode_prompt(rm_tokenizer, p) + encode_completion(rm_tokenizer, t, add_eos=e)
                        for p, t, e in zip(prompts, texts, ended)]  # EOS only where the policy ended
                ids, mask = pad(seqs, rm_tokenizer.pad_token_id, side="right")
                ids, mask = ids.to(device), mask.to(device)
            with autocast(device):
                return last_token_scores(reward_model, ids, mask)
    else:
        fail(f"unknown --reward {kind}: use model, gold or length")
    return reward_fn


def response_length(responses: torch.Tensor, response_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Number of response tokens excluding EOS. (B, R) -> (B,)"""
    return response_mask.sum(-1) - ((responses == eos_id) & (response_mask == 1)).any(-1).long()


@torch.no_grad()
def evaluate(policy, ref_policy, tokenizer, rows: list[dict], reward_fn, device, max_new_tokens: int,
             temperature: float = 1.0, batch_size: int = 64, greedy: bool = False,
             target_length: int | None = None, toy: bool = False, seed: int = 0) -> tuple[dict, list[dict]]:
    """Evaluate a policy on held-out prompts: mean reward, KL to the reference (sum over response
    tokens of log pi - log pi_ref, on the policy's samples), length, EOS rate, and on the toy world
    gold reward and well-formed rate. Returns (metrics, samples) with one sample dict per prompt.

    Sampling uses its own fixed seed (the training RNG is left untouched), so evaluations of two
    policies differ by the policies, not by sampling noise."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _evaluate(policy, ref_policy, tokenizer, rows, reward_fn, device, max_new_tokens, temperature,
                         batch_size, greedy, target_length, toy)


def _evaluate(policy, ref_policy, tokenizer, rows, reward_fn, device, max_new_tokens, temperature, batch_size,
              greedy, target_length, toy) -> tuple[dict, list[dict]]:
    policy.eval()
    samples = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        prompts = [r["prompt"] for r in batch]
        queries, query_mask = pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, "left")
        queries, query_mask = queries.to(device), query_mask.to(device)
        with autocast(device):
            responses, response_mask, ended, _ = generate(policy, queries, query_mask, tokenizer,
                                                          max_new_tokens, temperature, greedy)
            ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
            logprobs, _ = response_logprobs(policy, ids, mask, queries.shape[1], temperature)
            ref_logprobs, _ = response_logprobs(ref_policy, ids, mask, queries.shape[1], temperature)
            scores = reward_fn(prompts, queries, query_mask, responses, response_mask)
        kl = ((logprobs - ref_logprobs) * response_mask).sum(-1)
        lengths = response_length(responses, response_mask, tokenizer.eos_token_id)
        texts = decode_responses(tokenizer, responses, response_mask)
        for j, prompt in enumerate(prompts):
            sample = {"prompt": prompt, "response": texts[j], "reward": scores[j].item(), "kl": kl[j].item(),
                      "length": lengths[j].item(), "eos": bool(ended[j])}
            if toy:
                sample["gold"] = gold_reward(prompt, texts[j])
                sample["well_formed"] = well_formed(prompt, texts[j])
            samples.append(sample)
    metrics = {k: sum(float(s[k]) for s in samples) / len(samples)
               for k in ("reward", "kl", "length", "eos", "gold", "well_formed") if k in samples[0]}
    metrics["eos_rate"] = metrics.pop("eos")
    if target_length:
        metrics["length_error"] = sum(abs(s["length"] - target_length) for s in samples) / len(samples) / target_length
        metrics["within_10pct"] = sum(abs(s["length"] - target_length) <= 0.1 * target_length
                                      for s in samples) / len(samples)
    return metrics, samples


def print_samples(samples: list[dict], n: int = 5) -> None:
    """A small table of sample responses with their scores."""
    for s in samples[:n]:
        extra = f" gold={s['gold']:+.2f}" if "gold" in s else ""
        print(f"  reward={s['reward']:+.2f}{extra} len={s['length']:>2} | {s['prompt']} || {s['response']}")


def length_stratified_gain(base_rewards: list[float], base_lengths: list[int], rewards: list[float],
                           lengths: list[int], bin_width: int = 5) -> dict:
    """Reward gain not explained by length (Singhal et al. 2023, "A Long Way to Go", WRG/NRG).

    Bucket responses by length (bins of `bin_width` tokens); in each bin holding responses of both
    the base (SFT) and the trained policy, take the gain mean(reward) - mean(base reward); average
    those gains weighted by the bin's number of responses. `length_share` is the part of the total
    gain that the stratified gain does not keep: 1 - stratified / total (near 1: the gain is length)."""
    bins: dict[int, tuple[list[float], list[float]]] = {}
    for group, (rs, ls) in enumerate(((base_rewards, base_lengths), (rewards, lengths))):
        for r, n in zip(rs, ls):
            bins.setdefault(n // bin_width, ([], []))[group].append(r)
    shared = [(base, new) for base, new in bins.values() if base and new]
    weight = sum(len(base) + len(new) for base, new in shared)
    stratified = sum((len(base) + len(new)) * (sum(new) / len(new) - sum(base) / len(base))
                     for base, new in shared) / max(weight, 1)
    total = sum(rewards) / len(rewards) - sum(base_rewards) / len(base_rewards)
    return {"reward_gain": total, "length_stratified_gain": stratified,
            "length_share": 1 - stratified / total if total else float("nan")}
