"""Reward model: the second stage of RLHF.

Train a scalar-head model, initialized from the SFT model, on preference pairs with the
Bradley-Terry loss -log sigmoid(r(x, y_chosen) - r(x, y_rejected)), reading each score at the
last real token (EOS). After training, shift the scores so that SFT demonstrations score 0 on
average (an N+ implementation detail), and measure how much the score tracks response length
("A Long Way to Go", Singhal et al. 2023), optionally with that paper's two data interventions.

    python sft.py && python reward_model.py         # toy world, a few minutes on a CPU
    python reward_model.py --model_name_or_path my-sft-model --dataset_name trl-lib/ultrafeedback_binarized
"""

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro

import common


@dataclass
class Args:
    model_name_or_path: str = "runs/sft"
    """the SFT model to start from (`python sft.py` writes runs/sft), a hub id, or a local directory"""
    dataset_name: str = "toy"
    """`toy`, a hub id, or a local .json/.jsonl/.parquet file or `save_to_disk` folder of preference pairs"""
    dataset_config: str | None = None
    """dataset configuration name on the hub"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_test_split: str = "test"
    """split to evaluate on (without one, the last `eval_rows` training rows are held out)"""
    output_dir: str = "runs/reward_model"
    """where the model, args.json, metrics.jsonl and summary.json go"""
    seed: int = 1
    """random seed"""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`"""
    track: bool = False
    """log to Weights & Biases"""
    fsdp: bool = False
    """under torchrun: shard the trained models across the processes (FSDP2) instead of a full copy in each (DDP)"""
    learning_rate: float = 1e-3
    """peak learning rate, decayed linearly to 0"""
    num_epochs: int = 2
    """passes over the training pairs"""
    batch_size: int = 32
    """preference pairs per optimizer step, over all processes (each takes an equal share; twice as
    many sequences per forward pass)"""
    micro_batch_size: int | None = None
    """pairs of one forward/backward pass on one process: gradients accumulate over the batch's micro-batches, and
    held-out scoring runs in chunks of twice as many sequences (memory, not results); None: the whole batch"""
    gradient_checkpointing: bool = False
    """recompute the activations in the backward pass instead of keeping them (less memory, more compute)"""
    max_length: int = 128
    """prompt + response tokens (at most the model's positions); pairs with a longer sequence are
    dropped, as the score is read at EOS"""
    max_train_rows: int | None = None
    """use only the first rows of the training split (quick tests)"""
    center_rewards_coef: float = 0.0
    """TRL's centering term coef * mean((r_chosen + r_rejected)^2), which keeps scores near 0 (0: off)"""
    length_balance: bool = False
    """subsample training pairs so that chosen-minus-rejected length differences are symmetric"""
    length_bin_width: int = 2
    """width, in tokens, of the length-difference bins that --length_balance equalizes"""
    random_augment: float = 0.0
    """fraction (0 to 1) of training pairs that also get a copy whose rejected is another prompt's chosen"""
    eval_every: int = 25
    """evaluate held-out accuracy every this many steps"""
    eval_rows: int = 256
    """held-out preference pairs"""
    demo_rows: int = 1000
    """SFT demonstrations scored to shift the mean score to 0 (toy: the `sft` data; else: chosen responses)"""
    save_every: int = 200
    """write a checkpoint every this many optimizer steps"""
    resume: bool = False
    """continue the run in --output_dir from its latest checkpoint"""
    overwrite: bool = False
    """replace the run in --output_dir"""


def check_args(args: Args, world_size: int) -> None:
    """fail() with a one-line error on a flag out of its range, or on flags that do not fit together."""
    common.check_args(args, positive=("learning_rate", "num_epochs", "batch_size", "max_length", "max_train_rows",
                                      "length_bin_width", "eval_every", "eval_rows", "demo_rows", "save_every",
                                      "micro_batch_size"),
                      nonnegative=("center_rewards_coef", "random_augment"))
    if args.random_augment > 1:
        common.fail(f"--random_augment is a fraction of the training pairs: at most 1, got {args.random_augment}")
    if args.batch_size % world_size:
        common.fail(f"--batch_size {args.batch_size} must be divisible by the {world_size} processes")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0, count: int | None = None) -> torch.Tensor:
    """Bradley-Terry loss of a reward model on preference pairs, as in TRL's RewardTrainer.

    chosen, rejected, margin: (B,) scores r(x, y_c), r(x, y_r) and optional required margins m.

        L = mean(-log sigmoid(r_c - r_r - m)) + center_coef * mean((r_c + r_r)^2)

    The model of preferences is P(y_c > y_r) = sigmoid(r_c - r_r); the margin (Llama 2) asks for a
    larger gap on pairs the annotators rated as clearly different; the centering term (Eisenstein et
    al. 2023) pins the otherwise free offset of the scores near 0. The means are over the pairs of
    every process's share of the batch (common.masked_mean), so that several processes, each with
    its share, get the gradient of one process with the whole batch. For a micro-batch of a batch, `count` is the
    batch's number of pairs (on this process): the micro-batches' losses then add up to the batch's."""
    pairs = torch.ones_like(chosen)
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    loss = common.masked_mean(-F.logsigmoid(diff), pairs, count)
    if center_coef:
        loss = loss + center_coef * common.masked_mean((chosen + rejected) ** 2, pairs, count)
    return loss


def length_balance(length_diffs: list[int], bin_width: int, rng: random.Random) -> list[int]:
    """Indices of the pairs to keep so that the length difference len(chosen) - len(rejected) is
    symmetric ("length balancing", Singhal et al. 2023, section 5).

    Pairs go to bins k = sign(d) * ceil(|d| / bin_width): bin +k holds the pairs whose chosen is
    longer by 1..bin_width tokens (for k=1), bin -k the mirrored ones. In each mirrored pair of bins
    the larger is subsampled to the size of the smaller, so a longer response is chosen exactly as
    often as a shorter one; pairs of equal length (bin 0) are all kept."""
    bins: dict[int, list[int]] = {}
    for i, d in enumerate(length_diffs):
        k = (1 if d > 0 else -1) * math.ceil(abs(d) / bin_width)
        bins.setdefault(k, []).append(i)
    keep = list(bins.get(0, []))
    for k in sorted({abs(k) for k in bins if k != 0}):
        longer, shorter = bins.get(k, []), bins.get(-k, [])
        n = min(len(longer), len(shorter))
        keep += rng.sample(longer, n) + rng.sample(shorter, n)
    return sorted(keep)


def random_augment(rows: list[dict], fraction: float, rng: random.Random) -> list[dict]:
    """The rows plus, for a random `fraction` of them, a pair whose chosen is the row's chosen and
    whose rejected is the chosen of a row with another prompt ("random data augmentation", Singhal
    et al. 2023): an off-topic answer must lose whatever its length, which teaches relevance."""
    if len({row["prompt"] for row in rows}) < 2:  # no other prompt to borrow an answer from
        return rows
    extra = []
    for i in rng.sample(range(len(rows)), round(fraction * len(rows))):
        j = rng.randrange(len(rows))
        while rows[j]["prompt"] == rows[i]["prompt"]:
            j = rng.randrange(len(rows))
        extra.append({"prompt": rows[i]["prompt"], "chosen": rows[i]["chosen"], "rejected": rows[j]["chosen"]})
    return rows + extra


def tokenize(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Each row with `chosen_ids`/`rejected_ids` (prompt + response + EOS) and the response lengths
    in tokens (EOS excluded). A pair with a sequence longer than max_length is left out (its EOS,
    where the score is read, would not fit); says how many."""
    examples = []
    for row in rows:
        prompt = common.encode_prompt(tokenizer, row["prompt"])
        chosen = common.encode_completion(tokenizer, row["chosen"], prompt=row["prompt"])
        rejected = common.encode_completion(tokenizer, row["rejected"], prompt=row["prompt"])
        if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
            examples.append({**row, "chosen_ids": prompt + chosen, "rejected_ids": prompt + rejected,
                             "chosen_len": len(chosen) - 1, "rejected_len": len(rejected) - 1})
    if len(examples) < len(rows) and common.rank() == 0:
        print(f"note: {len(rows) - len(examples)} of {len(rows)} preference pairs are longer than {max_length} "
              "tokens: left out")
    if not examples:
        common.fail(f"no preference pair fits in {max_length} tokens: raise --max_length "
                    "(at most the model's positions)")
    return examples


@torch.no_grad()
def score_sequences(model: common.TokenScores, seqs: list[list[int]], pad_id: int, batch_size: int,
                    device) -> torch.Tensor:
    """Scores (N,) of N token sequences, each read at its last token. Each process scores its own
    contiguous share of the sequences and the shares are gathered, so every process returns all N."""
    model = common.unwrap(model)  # no DDP: the processes may run different numbers of batches
    share = math.ceil(len(seqs) / common.world_size())
    mine = seqs[common.rank() * share:(common.rank() + 1) * share]
    real = len(mine)  # FSDP: every rank makes as many passes through the sharded model, padded with copies
    mine += [seqs[0]] * (share - real if common.sharded(model) else 0)
    scores = [torch.zeros(0)]
    for i in range(0, len(mine), batch_size):
        ids, mask = common.pad(mine[i:i + batch_size], pad_id, side="right")
        with common.autocast(device):
            scores.append(common.last_token_scores(model, ids.to(device), mask.to(device)).cpu())
    return common.gather(torch.cat(scores)[:real])


def score_pairs(model: common.TokenScores, examples: list[dict], pad_id: int, batch_size: int,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N,) of the chosen and (N,) of the rejected sequences of N tokenized pairs."""
    return (score_sequences(model, [e["chosen_ids"] for e in examples], pad_id, batch_size, device),
            score_sequences(model, [e["rejected_ids"] for e in examples], pad_id, batch_size, device))


def pairwise_accuracy(margins: torch.Tensor) -> float:
    """Fraction of pairs (B,) whose margin r_chosen - r_rejected is positive; a tie counts half,
    as a coin flip would."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()


def accuracy_by_length_diff(margins: torch.Tensor, length_diffs: torch.Tensor, width: int = 5) -> dict:
    """Accuracy per bin of len(chosen) - len(rejected): {"-5..-1": {"n": 12, "accuracy": 0.58}, ...}.
    A reward model that learned length wins where the chosen is longer and loses where it is shorter."""
    bins = {}
    for lo in sorted(set((length_diffs // width * width).tolist())):
        in_bin = (length_diffs >= lo) & (length_diffs < lo + width)
        bins[f"{lo}..{lo + width - 1}"] = {"n": int(in_bin.sum()), "accuracy": pairwise_accuracy(margins[in_bin])}
    return bins


@torch.no_grad()
def shift_scores(model, shift: float) -> bool:
    """Subtract `shift` from every score the model outputs, in its weights, so that the shift
    survives save_pretrained / AutoModelForSequenceClassification.from_pretrained. Returns False
    where that is not possible.

    The `score` head of transformers' decoder classifiers (GPT-2, Pythia, Llama, ...) is a Linear
    without bias, and a bias added to it is dropped on reload because the class rebuilds the head
    from the config. So we fold the shift into the bias of the final LayerNorm that feeds the head:
    w . (h + delta) = w . h - shift for delta = -shift * w / |w|^2. RMSNorm models (Llama, Mistral,
    Qwen, Gemma) end in g * x / rms(x): no bias after the normalization, and a constant added before
    it is divided by rms(x), which varies with the input. No edit of their weights shifts every
    score by the same amount, so they keep their offset (the same under transformers as here)."""
    final_norms = [m for name, m in model.base_model.named_modules()
                   if name.split(".")[-1] in ("ln_f", "final_layer_norm", "final_layernorm", "norm")]
    if not final_norms or getattr(final_norms[-1], "bias", None) is None:
        return False
    if shift != 0:  # a zero head gives zero scores, hence shift 0 and nothing to divide by
        w = model.score.weight[0]
        final_norms[-1].bias -= shift * w / w.dot(w)
    return True


def prepare_for_transformers(classifier, tokenizer) -> None:
    """Make the saved reward model score under plain transformers (AutoModelForSequenceClassification and
    AutoTokenizer) exactly as last_token_scores scores it here. transformers reads each score at the last token that
    is not the pad: where the pad is a stop token (pad == EOS, as for every model that ships without a pad), that
    is the token before the EOS. So such a model gets a pad token of its own (one more embedding row where the
    matrix has none to spare; nothing attends to a pad). And transformers derives no position ids from the mask,
    which only right padding makes harmless: the saved tokenizer pads on the right."""
    if tokenizer.pad_token_id in common.stop_ids(tokenizer):
        pad, vocab = "<pad>", tokenizer.get_vocab()
        while pad in vocab:  # a token of its own, never one that a text holds
            pad = f"<{pad}>"
        tokenizer.add_special_tokens({"pad_token": pad})
        if tokenizer.pad_token_id >= classifier.get_input_embeddings().num_embeddings:
            classifier.resize_token_embeddings(tokenizer.pad_token_id + 1, mean_resizing=False)
        classifier.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    check_args(args, common.world_size())
    device, rank, world_size = common.setup(args)
    toy = args.dataset_name == common.TOY
    hint = "run `python sft.py` first or pass --model_name_or_path"
    tokenizer = common.load_tokenizer(args.model_name_or_path, hint)
    train_rows, test_rows = common.load_data(args.dataset_name, "preference", tokenizer, args.dataset_config,
                                             args.dataset_train_split, args.dataset_test_split,
                                             args.eval_rows, args.max_train_rows)
    # demonstrations from the SFT stage, whose mean score becomes 0 after training
    demo_rows = (common.load_data(common.TOY, "sft", tokenizer, max_train_rows=args.demo_rows)[0] if toy
                 else train_rows[:args.demo_rows])  # preference rows carry `completion` = chosen
    model = common.TokenScores(common.load_model(args.model_name_or_path, tokenizer, "score", hint, device,
                                                 gradient_checkpointing=args.gradient_checkpointing))
    max_length = min(args.max_length, common.max_positions(model.classifier))

    # ---- length interventions on the training pairs (Singhal et al. 2023) ----
    rng = random.Random(args.seed)
    if args.length_balance:
        diffs = [len(common.encode_completion(tokenizer, r["chosen"], prompt=r["prompt"])) -
                 len(common.encode_completion(tokenizer, r["rejected"], prompt=r["prompt"])) for r in train_rows]
        train_rows = [train_rows[i] for i in length_balance(diffs, args.length_bin_width, rng)]
    if args.random_augment > 0:
        train_rows = random_augment(train_rows, args.random_augment, rng)
    train, test = tokenize(train_rows, tokenizer, max_length), tokenize(test_rows, tokenizer, max_length)
    demos = [common.encode_prompt(tokenizer, r["prompt"])
             + common.encode_completion(tokenizer, r["completion"], prompt=r["prompt"]) for r in demo_rows]
    demos = [d for d in demos if len(d) <= max_length]  # the pairs' context rule
    if not demos:
        common.fail(f"no demonstration fits in {max_length} tokens: raise --max_length (at most the model's positions)")

    # the shuffled passes over the pairs form one stream (as in ppo.py), so that every batch is full and
    # splits evenly over the processes; a batch may run into the next pass
    num_steps = math.ceil(args.num_epochs * len(train) / args.batch_size)
    local_batch_size = args.batch_size // world_size  # this process's share of each batch
    micro_batch_size = min(args.micro_batch_size or local_batch_size, local_batch_size)  # pairs per forward pass
    eval_pairs = args.micro_batch_size or args.batch_size  # pairs per held-out scoring pass
    model = common.distribute(model, device, args.fsdp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / num_steps)
    derived = {"num_steps": num_steps, "local_batch_size": local_batch_size, "micro_batch_size": micro_batch_size}
    run = common.Run(args, {"model": model, "optimizer": optimizer, "scheduler": scheduler}, derived)
    order, start = [], 1  # the loop's state (with rng), fresh or resumed
    if run.resumed:
        rng, order, start = run.resumed["rng"], run.resumed["order"], run.resumed["step"] + 1
    pad_id = tokenizer.pad_token_id
    if common.rank() == 0:
        print(f"{len(train)} training pairs, {len(test)} held-out, {num_steps} steps, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device} x {world_size}")

    # ---- training: Bradley-Terry loss on (chosen, rejected) pairs ----
    model.train()  # dropout is off: train mode changes nothing but lets gradient checkpointing act
    for step in common.progress(range(start, num_steps + 1), desc="reward model", initial=start - 1, total=num_steps):
        # 1. the next batch of the shuffled pairs (epoch after epoch); this process takes its share
        while len(order) < args.batch_size:
            order += rng.sample(range(len(train)), len(train))
        batch, order = [train[j] for j in order[:args.batch_size][rank::world_size]], order[args.batch_size:]
        # 2. score chosen and rejected in one forward pass, right-padded: (2B, T), chosen rows first,
        # each score read at the sequence's last real token, its EOS; in micro-batches of pairs, whose gradients add up
        margins, train_loss = [], 0.0
        for first in range(0, len(batch), micro_batch_size):
            part = batch[first:first + micro_batch_size]
            ids, mask = common.pad([e["chosen_ids"] for e in part] + [e["rejected_ids"] for e in part],
                                   pad_id, side="right")
            with common.grad_sync(model, sync=first + micro_batch_size >= len(batch)):
                with common.autocast(device):
                    scores = common.last_token_scores(model, ids.to(device), mask.to(device))  # (2B,)
                chosen, rejected = scores[:len(part)], scores[len(part):]
                # 3. the loss, with each pair's required margin (a row without a margin column gets 0: plain
                # Bradley-Terry), a mean over the pairs of the whole batch
                margin = torch.tensor([float(e.get("margin", 0.0)) for e in part], device=device)
                loss = bradley_terry_loss(chosen, rejected, margin, args.center_rewards_coef, len(batch))
                run.check_finite(step, loss=loss)
                loss.backward()
            margins.append((chosen - rejected).detach())
            train_loss += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        run.check_finite(step, grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % args.eval_every == 0 or step == num_steps:
            margins = common.gather(torch.cat(margins))  # of the whole batch, every process's share
            eval_chosen, eval_rejected = score_pairs(model, test, pad_id, 2 * eval_pairs, device)
            run.log({"episode": step * args.batch_size, "epoch": step * args.batch_size / len(train),
                     "loss/train": train_loss, "accuracy/train": pairwise_accuracy(margins),
                     "margin/train": margins.mean().item(),
                     "accuracy/eval": pairwise_accuracy(eval_chosen - eval_rejected),
                     "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0]}, step)
        if step % args.save_every == 0 and step < num_steps:
            run.save(step, rng=rng, order=order)

    if args.fsdp:  # the rest on a plain copy of the trained model on every process, whose weights it can edit
        model = common.gathered(model, common.TokenScores(common.load_model(args.model_name_or_path, tokenizer, "score",
                                                                            hint, device)))
    # ---- normalization (N+ detail): shift scores so that SFT demonstrations score 0 on average ----
    # (the scores are gathered, so the mean and the shifted weights are the same in every process)
    classifier = common.unwrap(model).classifier
    demo_score_mean = score_sequences(model, demos, pad_id, 2 * eval_pairs, device).mean().item()
    centered = shift_scores(classifier, demo_score_mean)
    if not centered:
        print(f"note: {type(classifier).__name__} has no bias after its final normalization (an RMSNorm, say) to "
              f"shift: its scores keep their demonstration mean {demo_score_mean:.3f}")

    # ---- evaluation on held-out pairs: accuracy, length correlation, and on toy the gold reward ----
    chosen, rejected = score_pairs(model, test, pad_id, 2 * eval_pairs, device)
    chosen_len = torch.tensor([e["chosen_len"] for e in test])
    rejected_len = torch.tensor([e["rejected_len"] for e in test])
    scores, lengths = torch.cat([chosen, rejected]), torch.cat([chosen_len, rejected_len]).float()
    summary = {"accuracy": pairwise_accuracy(chosen - rejected),
               "length_corr": torch.corrcoef(torch.stack([scores, lengths]))[0, 1].item(),
               "demo_score_mean": demo_score_mean, "centered": centered}
    if toy:
        # The noise-free preference: gold margins, 0 on a gold tie (where either answer is right,
        # so pairwise_accuracy counts it half).
        gold_margins = torch.tensor([common.gold_reward(e["prompt"], e["chosen"]) -
                                     common.gold_reward(e["prompt"], e["rejected"]) for e in test])
        summary["gold_accuracy"] = pairwise_accuracy((chosen - rejected) * gold_margins.sign())
        # the accuracy of the gold reward itself on the annotator's noisy labels; an RM can pass it
        # only by also learning the annotator's length bias (which length_corr then shows)
        summary["label_ceiling"] = pairwise_accuracy(gold_margins)
    summary["accuracy_by_length_diff"] = accuracy_by_length_diff(chosen - rejected, chosen_len - rejected_len)
    # ---- saving, so that transformers' AutoModelForSequenceClassification gives these same scores ----
    prepare_for_transformers(classifier, tokenizer)
    run.finish(classifier, tokenizer, summary)
