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
import time
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
    learning_rate: float = 1e-3
    """peak learning rate, decayed linearly to 0 (2e-3 was unstable on the toy world: gradient-norm
    spikes, and held-out agreement with gold fell from 0.72 to 0.61)"""
    num_epochs: int = 2
    """passes over the training pairs"""
    batch_size: int = 32
    """preference pairs per optimizer step (twice as many sequences per forward pass)"""
    max_length: int = 128
    """prompt + response tokens; pairs with a longer sequence are dropped, as the score is read at EOS"""
    max_train_rows: int | None = None
    """use only the first rows of the training split (quick tests)"""
    center_rewards_coef: float = 0.0
    """TRL's centering term coef * mean((r_chosen + r_rejected)^2), which keeps scores near 0 (0: off)"""
    length_balance: bool = False
    """subsample training pairs so that chosen-minus-rejected length differences are symmetric"""
    length_bin_width: int = 2
    """width, in tokens, of the length-difference bins that --length_balance equalizes"""
    random_augment: float = 0.0
    """fraction of training pairs that also get a copy whose rejected is another prompt's chosen"""
    eval_every: int = 25
    """evaluate held-out accuracy every this many steps"""
    eval_rows: int = 256
    """held-out preference pairs"""
    demo_rows: int = 1000
    """SFT demonstrations scored to shift the mean score to 0 (toy: the `sft` data; else: chosen responses)"""


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss of a reward model on preference pairs, as in TRL's RewardTrainer.

    chosen, rejected, margin: (B,) scores r(x, y_c), r(x, y_r) and optional required margins m.

        L = mean(-log sigmoid(r_c - r_r - m)) + center_coef * mean((r_c + r_r)^2)

    The model of preferences is P(y_c > y_r) = sigmoid(r_c - r_r); the margin (Llama 2) asks for a
    larger gap on pairs the annotators rated as clearly different; the centering term (Eisenstein et
    al. 2023) pins the otherwise free offset of the scores near 0."""
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
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
    in tokens (EOS excluded); pairs with a sequence longer than max_length are dropped."""
    examples = []
    for row in rows:
        prompt = common.encode_prompt(tokenizer, row["prompt"])
        chosen = common.encode_completion(tokenizer, row["chosen"])
        rejected = common.encode_completion(tokenizer, row["rejected"])
        if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
            examples.append({**row, "chosen_ids": prompt + chosen, "rejected_ids": prompt + rejected,
                             "chosen_len": len(chosen) - 1, "rejected_len": len(rejected) - 1})
    return examples


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], pad_id: int, batch_size: int, device) -> torch.Tensor:
    """Scores (N,) of N token sequences, each read at its last token."""
    model.eval()
    scores = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = common.pad(seqs[i:i + batch_size], pad_id, side="right")
        with common.autocast(device):
            scores.append(common.last_token_scores(model, ids.to(device), mask.to(device)).cpu())
    model.train()
    return torch.cat(scores)


def score_pairs(model, examples: list[dict], pad_id: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
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
    w . (h + delta) = w . h - shift for delta = -shift * w / |w|^2. RMSNorm models (Llama) have no
    such bias."""
    final_norms = [m for name, m in model.base_model.named_modules()
                   if name.split(".")[-1] in ("ln_f", "final_layer_norm", "final_layernorm")]
    if not final_norms or getattr(final_norms[-1], "bias", None) is None:
        return False
    if shift != 0:  # a zero head gives zero scores, hence shift 0 and nothing to divide by
        w = model.score.weight[0]
        final_norms[-1].bias -= shift * w / w.dot(w)
    return True


if __name__ == "__main__":
    args = tyro.cli(Args)
    common.require_positive(args, "learning_rate", "num_epochs", "batch_size", "max_length", "eval_every",
                            "eval_rows", "length_bin_width")
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    hint = "run `python sft.py` first or pass --model_name_or_path"
    tokenizer = common.load_tokenizer(args.model_name_or_path, hint)
    toy = args.dataset_name == common.TOY
    train_rows, test_rows = common.load_data(args.dataset_name, "preference", tokenizer, args.dataset_config,
                                             args.dataset_train_split, args.dataset_test_split,
                                             args.eval_rows, args.max_train_rows)
    # demonstrations from the SFT stage, whose mean score becomes 0 after training
    demo_rows = (common.load_data(common.TOY, "sft", tokenizer, max_train_rows=args.demo_rows)[0] if toy
                 else train_rows[:args.demo_rows])  # preference rows carry `completion` = chosen
    model = common.load_model(args.model_name_or_path, tokenizer, "score", hint).to(device)
    common.disable_dropout(model)  # as TRL's RewardConfig: both scores of a pair see the same network

    # ---- length interventions on the training pairs (Singhal et al. 2023) ----
    rng = random.Random(args.seed)
    if args.length_balance:
        diffs = [len(common.encode_completion(tokenizer, r["chosen"])) -
                 len(common.encode_completion(tokenizer, r["rejected"])) for r in train_rows]
        train_rows = [train_rows[i] for i in length_balance(diffs, args.length_bin_width, rng)]
    if args.random_augment > 0:
        train_rows = random_augment(train_rows, args.random_augment, rng)
    train, test = tokenize(train_rows, tokenizer, args.max_length), tokenize(test_rows, tokenizer, args.max_length)
    if not train or not test:
        common.fail(f"no preference pair fits in --max_length {args.max_length}: raise it")

    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    num_steps = args.num_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / num_steps)
    logger = common.Logger(args.output_dir, args, args.track)
    pad_id = tokenizer.pad_token_id
    print(f"{len(train)} training pairs ({len(train_rows) - len(train)} too long), {len(test)} held-out, "
          f"{num_steps} steps, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")

    # ---- training: Bradley-Terry loss on (chosen, rejected) pairs ----
    model.train()
    step, start = 0, time.time()
    bar = common.progress(total=num_steps, desc="reward model")
    for epoch in range(args.num_epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order), args.batch_size):
            batch = [train[j] for j in order[i:i + args.batch_size]]
            # chosen and rejected in one forward pass, right-padded: (2B, T), chosen rows first
            ids, mask = common.pad([e["chosen_ids"] for e in batch] + [e["rejected_ids"] for e in batch],
                                   pad_id, side="right")
            # a row without a margin column gets 0: the plain Bradley-Terry loss
            margin = torch.tensor([float(e.get("margin", 0.0)) for e in batch], device=device)
            with common.autocast(device):
                scores = common.last_token_scores(model, ids.to(device), mask.to(device))  # (2B,)
            chosen, rejected = scores[:len(batch)], scores[len(batch):]
            loss = bradley_terry_loss(chosen, rejected, margin, args.center_rewards_coef)
            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update()
            metrics = {"episode": step * args.batch_size, "epoch": epoch, "loss/train": loss.item(),
                       "accuracy/train": pairwise_accuracy(chosen - rejected),
                       "margin/train": (chosen - rejected).mean().item(), "grad_norm": grad_norm.item(),
                       "lr": scheduler.get_last_lr()[0], "time/train": time.time() - start}
            if step % args.eval_every == 0 or step == num_steps:
                eval_chosen, eval_rejected = score_pairs(model, test, pad_id, 2 * args.batch_size, device)
                metrics["accuracy/eval"] = pairwise_accuracy(eval_chosen - eval_rejected)
            logger.log(metrics, step)
    bar.close()
    train_time = time.time() - start

    # ---- normalization (N+ detail): shift scores so that SFT demonstrations score 0 on average ----
    demos = [common.encode_prompt(tokenizer, r["prompt"]) + common.encode_completion(tokenizer, r["completion"])
             for r in demo_rows]
    demo_score_mean = score_sequences(model, demos, pad_id, 2 * args.batch_size, device).mean().item()
    if not shift_scores(model, demo_score_mean):
        print(f"note: {type(model).__name__} has no LayerNorm bias under its score head to shift; "
              f"scores keep their demonstration mean {demo_score_mean:.3f}")

    # ---- evaluation on held-out pairs: accuracy, length correlation, and on toy the gold reward ----
    chosen, rejected = score_pairs(model, test, pad_id, 2 * args.batch_size, device)
    chosen_len = torch.tensor([e["chosen_len"] for e in test])
    rejected_len = torch.tensor([e["rejected_len"] for e in test])
    scores, lengths = torch.cat([chosen, rejected]), torch.cat([chosen_len, rejected_len]).float()
    summary = {"accuracy": pairwise_accuracy(chosen - rejected),
               "length_corr": torch.corrcoef(torch.stack([scores, lengths]))[0, 1].item(),
               "demo_score_mean": demo_score_mean, "train_time": round(train_time, 1)}
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
    print("summary: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float)))
    common.save_run(args.output_dir, model, tokenizer, args, summary)
    logger.close()
