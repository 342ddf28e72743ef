"""RRHF: Rank Responses to align language models with Human Feedback (Yuan et al., 2023).

No value model, no PPO: for each query, k candidate responses from several sources are scored by a
reward; the model learns to give higher length-normalized log-probability to higher-reward
candidates (a ranking loss) while fine-tuning on the best one. It needs the policy and a reward,
plus the initial model only to sample from it or for the optional KL penalty.

    python rrhf.py                                  # toy world, after sft.py and reward_model.py
    python rrhf.py --sources online --kl_coef 0.05  # online sampling (the paper's OP-k) with a KL penalty
    python rrhf.py --rrhf_data data.jsonl --reward gold  # ready-made {query, responses, scores} rows
"""

import json
import os
import random
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import common


@dataclass
class Args:
    sft_model_path: str = "runs/sft"
    """the model to align (and the initial model `initial` samples from): hub id or local directory"""
    reward: Literal["model", "gold", "length"] = "model"
    """`model`: the reward model; `gold`: the toy gold reward; `length`: 1 - |n/N - 1|"""
    reward_model_path: str = "runs/reward_model"
    """reward model for `--reward model`: hub id or local directory"""
    target_length: int = 20
    """N of the golden length reward (`--reward length`)"""
    dataset_name: str = "toy"
    """prompts (and demonstrations): `toy`, a hub id, or a local file or `save_to_disk` folder"""
    dataset_config: str | None = None
    """dataset configuration name on the hub"""
    dataset_train_split: str = "train"
    """split whose prompts we train on"""
    dataset_test_split: str = "test"
    """split whose prompts the final evaluation samples on"""
    rrhf_data: str | None = None
    """a ready-made RRHF .jsonl ({query, responses, scores} rows) replacing sampling and scoring"""
    output_dir: str = "runs/rrhf"
    """where the model, args.json, metrics.jsonl and summary.json go"""
    seed: int = 1
    """random seed"""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`"""
    track: bool = False
    """log to Weights & Biases"""
    total_episodes: int = 512
    """queries to train on, each with all of its candidate responses"""
    queries_per_step: int = 16
    """queries per optimizer step; all their candidates go through one forward pass"""
    num_samples: int = 8
    """k: responses sampled per query from each of the `online` and `initial` sources"""
    # The default is the paper's main setting; `online` without --kl_coef hacks a learned reward.
    sources: tuple[Literal["online", "initial", "demo"], ...] = ("initial", "demo")
    """candidates from `online` (the model trained), `initial` (the SFT model), `demo` (the dataset's responses)"""
    refresh_every: int = 1
    """sample the online candidates for this many steps at once (the paper's OP-k, k = this)"""
    temperature: float = 1.0
    """sampling temperature for candidates and for the evaluation"""
    max_new_tokens: int = 48
    """length limit of sampled responses (and of dataset responses, which are cut to it)"""
    learning_rate: float = 1e-3
    """peak learning rate, decayed linearly to 0"""
    length_penalty: float = 1.0
    """exponent on |y| in the score p = sum log pi / |y|^length_penalty"""
    rank_coef: float = 1.0
    """weight of the ranking loss: L = rank_coef * L_rank + L_ft"""
    kl_coef: float = 0.0
    """beta in the ranked reward r - beta * log(pi / pi_ref): the paper's fix for online hacking; 0: off"""
    eval_rows: int = 256
    """held-out prompts for the final evaluation"""
    eval_batch_size: int = 64
    """prompts per generation batch in the final evaluation"""


def sequence_scores(logprobs: torch.Tensor, response_mask: torch.Tensor, length_penalty: float = 1.0) -> torch.Tensor:
    """RRHF's score of a response, p_i = sum_t log pi(y_i,t | x, y_i,<t) / |y_i|^length_penalty
    (paper Eq. 1 with the released code's exponent; 0 gives the plain sum).

    logprobs, response_mask (N, R) -> (N,). Padding after the response does not count in |y_i|."""
    lengths = response_mask.sum(-1).clamp(min=1).float()
    return (logprobs * response_mask).sum(-1) / lengths**length_penalty


def ranked_pairs(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """pairs[q, i, j] = True where r_i < r_j for two real candidates i, j of query q; ties are no pair.

    rewards (Q, K) float, valid (Q, K) bool (False for padding in rows with fewer candidates) -> (Q, K, K)."""
    both = valid[:, :, None] & valid[:, None, :]
    return both & (rewards[:, :, None] < rewards[:, None, :])


def rank_loss(scores: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """RRHF's ranking loss (paper Eq. 2), L_rank = sum over pairs with r_i < r_j of max(0, p_i - p_j),
    summed over the pairs of a query and averaged over queries (the released code takes one query
    per device and averages over devices: the same loss, one query at a time).

    scores, rewards (Q, K), valid (Q, K) bool -> scalar."""
    hinge = (scores[:, :, None] - scores[:, None, :]).clamp(min=0)  # [q, i, j] = max(0, p_i - p_j)
    return (hinge * ranked_pairs(rewards, valid)).sum((1, 2)).mean()


def finetune_loss(sum_logprobs: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """RRHF's fine-tuning loss (paper Eq. 3), L_ft = -sum_t log pi(y_best,t | x, y_best,<t) with
    best = argmax_i r_i, averaged over queries. (The released code takes a per-token mean instead.)

    sum_logprobs, rewards (Q, K), valid (Q, K) bool -> scalar."""
    best = rewards.masked_fill(~valid, float("-inf")).argmax(-1, keepdim=True)
    return -sum_logprobs.gather(1, best).mean()


def pack(query_ids: list[list[int]], responses: list[list[int]], pad_id: int):
    """Left-padded queries (N, Q) and right-padded responses (N, R), each with its mask, so that
    query + response sits in one (N, Q + R) tensor with the response starting at column Q."""
    queries, query_mask = common.pad(query_ids, pad_id, side="left")
    responses, response_mask = common.pad(responses, pad_id, side="right")
    return queries, query_mask, responses, response_mask


def sample(model, tokenizer, query_ids: list[list[int]], k: int, max_new_tokens: int, temperature: float,
           device: torch.device) -> list[list[list[int]]]:
    """k sampled responses per query (token lists up to and including the first EOS, if any)."""
    queries, query_mask = common.pad([q for q in query_ids for _ in range(k)], tokenizer.pad_token_id, "left")
    with common.autocast(device):
        responses, response_mask, _, _ = common.generate(model, queries.to(device), query_mask.to(device),
                                                         tokenizer, max_new_tokens, temperature)
    flat = [r[m.bool()].tolist() for r, m in zip(responses.cpu(), response_mask.cpu())]
    return [flat[i * k:(i + 1) * k] for i in range(len(query_ids))]


def read_rrhf_data(path: str) -> list[dict]:
    """Rows {"query": str, "responses": [str], "scores": [float]} of the released RRHF code's format."""
    if not os.path.exists(path):
        common.fail(f"{path} not found: pass a .jsonl file of {{query, responses, scores}} rows to --rrhf_data")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                common.fail(f"{path} line {n} is not JSON ({e.msg}): one {{query, responses, scores}} object per line")
            if (not isinstance(row, dict) or not {"query", "responses", "scores"} <= row.keys()
                    or len(row["responses"]) != len(row["scores"])):
                has = sorted(row) if isinstance(row, dict) else type(row).__name__
                common.fail(f"{path} line {n}: need query, responses and scores of equal length (has {has})")
            rows.append(row)
    if not rows:
        common.fail(f"{path} has no rows: one {{query, responses, scores}} object per line")
    return rows


if __name__ == "__main__":
    args = tyro.cli(Args)
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    start = time.time()
    common.require_positive(args, "total_episodes", "queries_per_step", "num_samples", "refresh_every",
                            "max_new_tokens", "eval_batch_size", "target_length")
    if args.total_episodes < args.queries_per_step:
        common.fail(f"--total_episodes {args.total_episodes} must be at least --queries_per_step {args.queries_per_step}")
    hint = "run `python sft.py` first or pass --sft_model_path"
    tokenizer = common.load_tokenizer(args.sft_model_path, hint)
    policy = common.load_model(args.sft_model_path, tokenizer, hint=hint).to(device)
    common.disable_dropout(policy)
    reward_fn = common.make_reward_fn(args.reward, tokenizer, device, args.reward_model_path, args.target_length)
    train_rows, test_rows = common.load_data(args.dataset_name, "prompts", tokenizer, args.dataset_config,
                                             args.dataset_train_split, args.dataset_test_split, args.eval_rows)
    sources = () if args.rrhf_data else args.sources
    if args.rrhf_data:  # candidates and their scores come from the file: no sampling, no scoring
        train_rows = read_rrhf_data(args.rrhf_data)
    elif not sources:
        common.fail("--sources is empty: pick from online, initial, demo")

    # The initial (SFT) model is needed during training only to sample from it or for the KL penalty.
    ref_policy = None
    if "initial" in sources or args.kl_coef:
        ref_policy = common.load_model(args.sft_model_path, tokenizer, hint=hint).to(device).eval()
        ref_policy.requires_grad_(False)
    num_models = 1 + (ref_policy is not None) + (args.reward == "model")  # held during training
    num_steps = max(args.total_episodes // args.queries_per_step, 1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / num_steps)
    logger = common.Logger(args.output_dir, args, args.track)
    print(f"{num_steps} steps of {args.queries_per_step} queries, sources {sources or args.rrhf_data}, "
          f"{num_models} model(s) in memory, on {device}")

    rng = random.Random(args.seed)
    order: list[int] = []
    stage_time = {"generation": 0.0, "scoring": 0.0, "training": 0.0}
    bar = common.progress(total=num_steps, desc="rrhf")
    for step in range(1, num_steps + 1):
        # ---- 1. collect candidates, every refresh_every steps for the queries of the next steps ----
        # Sampling them all at once from the current policy is OP-k without a frozen sampler copy.
        times = dict.fromkeys(stage_time, 0.0)
        if (step - 1) % args.refresh_every == 0:
            t0 = time.time()
            n_round = args.queries_per_step * min(args.refresh_every, num_steps - step + 1)
            while len(order) < n_round:  # epochs over the shuffled training rows
                order += rng.sample(range(len(train_rows)), len(train_rows))
            round_rows, order = [train_rows[i] for i in order[:n_round]], order[n_round:]
            prompts = [r["query" if args.rrhf_data else "prompt"] for r in round_rows]
            query_ids = [common.encode_prompt(tokenizer, p) for p in prompts]
            candidates: list[list[list[int]]] = [[] for _ in round_rows]  # token ids, per query
            labels: list[list[str]] = [[] for _ in round_rows]  # the source of each candidate
            if args.rrhf_data:
                for i, row in enumerate(round_rows):
                    candidates[i] = [common.encode_completion(tokenizer, c)[:args.max_new_tokens]
                                     for c in row["responses"]]
                    labels[i] = ["data"] * len(candidates[i])
            for source in sources:
                if source == "demo":  # the demonstration, or chosen and rejected for preference data
                    new = [[common.encode_completion(tokenizer, c)[:args.max_new_tokens]
                            for c in dict.fromkeys((r["completion"], r.get("rejected"))) if c is not None]
                           for r in round_rows]
                else:
                    new = sample(policy if source == "online" else ref_policy, tokenizer, query_ids,
                                 args.num_samples, args.max_new_tokens, args.temperature, device)
                for i, responses in enumerate(new):
                    candidates[i] += responses
                    labels[i] += [source] * len(responses)
            times["generation"] = time.time() - t0

        # ---- 2. this step's queries: score every candidate with the reward ----
        t0 = time.time()
        first = (step - 1) % args.refresh_every * args.queries_per_step
        batch = range(first, first + args.queries_per_step)
        k_max = max(len(candidates[i]) for i in batch)
        valid = torch.tensor([[j < len(candidates[i]) for j in range(k_max)] for i in batch], device=device)
        flat = [(i, response) for i in batch for response in candidates[i]]  # the N real candidates
        flat_labels = [label for i in batch for label in labels[i]]
        queries, query_mask, responses, response_mask = (
            t.to(device) for t in pack([query_ids[i] for i, _ in flat], [r for _, r in flat], tokenizer.pad_token_id))
        rewards = torch.zeros(valid.shape, device=device)  # (Q, K); padding slots are masked by `valid`
        # A response cut at max_new_tokens without EOS is scored like any other: its reward is
        # whatever the reward function gives it (the reward model reads its last token).
        if args.rrhf_data:
            rewards[valid] = torch.tensor([s for i in batch for s in round_rows[i]["scores"]], device=device)
        else:
            rewards[valid] = reward_fn([prompts[i] for i, _ in flat], queries, query_mask, responses, response_mask)
        times["scoring"] = time.time() - t0

        # ---- 3. the RRHF loss over all candidates of all queries, in one forward pass ----
        t0 = time.time()
        ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
        with common.autocast(device):
            logprobs, _ = common.response_logprobs(policy, ids, mask, queries.shape[1])  # (N, R)
        zeros = torch.zeros(valid.shape, device=device)
        scores = zeros.masked_scatter(valid, sequence_scores(logprobs, response_mask, args.length_penalty))  # p_i
        sum_logprobs = zeros.masked_scatter(valid, sequence_scores(logprobs, response_mask, 0.0))  # (Q, K)
        ranking_rewards, kl = rewards, None
        # With --kl_coef, rank by r - beta * log(pi(y) / pi_ref(y)), PPO's sequence-level KL penalty
        # (a KL estimate on the policy's own samples; on others it still favors what pi_ref likes).
        if args.kl_coef:
            with torch.no_grad(), common.autocast(device):
                ref_logprobs, _ = common.response_logprobs(ref_policy, ids, mask, queries.shape[1])
            kl = zeros.masked_scatter(valid, ((logprobs.detach() - ref_logprobs) * response_mask).sum(-1))
            ranking_rewards = rewards - args.kl_coef * kl
        loss_rank = rank_loss(scores, ranking_rewards, valid)
        loss_ft = finetune_loss(sum_logprobs, ranking_rewards, valid)
        loss = args.rank_coef * loss_rank + loss_ft
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        times["training"] = time.time() - t0
        bar.update()

        # ---- 4. logging: losses, how well the scores already rank the candidates, their rewards ----
        pairs = ranked_pairs(ranking_rewards, valid)
        correct = (pairs & (scores[:, :, None] < scores[:, None, :])).sum() / pairs.sum().clamp(min=1)
        lengths = common.response_length(responses, response_mask, tokenizer.eos_token_id).float()
        ended = ((responses == tokenizer.eos_token_id) & (response_mask == 1)).any(-1).float()
        metrics = {"episode": step * args.queries_per_step, "loss/rank": loss_rank.detach(),
                   "loss/ft": loss_ft.detach(), "loss/total": loss.detach(), "rank/accuracy": correct,
                   "objective/scores": rewards[valid].mean(), "objective/rlhf_reward": ranking_rewards[valid].mean(),
                   "response/length": lengths.mean(), "response/eos_rate": ended.mean(), "grad_norm": grad_norm,
                   "lr": scheduler.get_last_lr()[0], "eps": step * args.queries_per_step / (time.time() - start)}
        if kl is not None:
            metrics["objective/kl"] = kl[valid].mean()
        for source in sources:  # each source's mean reward: `online` is the policy's own
            metrics[f"objective/scores_{source}"] = rewards[valid][[s == source for s in flat_labels]].mean()
        if "online" in sources and args.dataset_name == common.TOY:  # true quality of the policy's samples
            texts = common.decode_responses(tokenizer, responses, response_mask)
            online = [(prompts[i], t) for (i, _), t, s in zip(flat, texts, flat_labels) if s == "online"]
            metrics["gold/reward"] = sum(common.gold_reward(p, t) for p, t in online) / len(online)
            metrics["gold/well_formed"] = sum(common.well_formed(p, t) for p, t in online) / len(online)
        for stage, seconds in times.items():
            stage_time[stage] += seconds
            metrics[f"time/{stage}"] = seconds
        logger.log(metrics, step)
    bar.close()

    # ---- 5. evaluation on held-out prompts, with the same keys as ppo.py, before and after ----
    train_time = time.time() - start
    if ref_policy is None:  # the KL to the initial model needs it, though training did not
        ref_policy = common.load_model(args.sft_model_path, tokenizer, hint=hint).to(device).eval()
    toy = args.dataset_name == common.TOY
    target_length = args.target_length if args.reward == "length" else None
    results = []
    for model in (policy, ref_policy):  # evaluate() fixes its own seed: a less noisy difference
        results.append(common.evaluate(model, ref_policy, tokenizer, test_rows, reward_fn, device, args.max_new_tokens,
                                       args.temperature, args.eval_batch_size, target_length=target_length, toy=toy))
    (summary, samples), (initial, initial_samples) = results
    summary |= common.length_stratified_gain(  # how much of the reward gain is only longer responses
        [s["reward"] for s in initial_samples], [s["length"] for s in initial_samples],
        [s["reward"] for s in samples], [s["length"] for s in samples])
    summary |= {"num_models": num_models, "train_time": round(train_time, 1),
                "initial": initial,
                **{f"time/{stage}": round(s, 1) for stage, s in stage_time.items()}}
    common.print_samples(samples)
    print("summary: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float | int)))
    print("initial: " + " ".join(f"{k}={v:.4g}" for k, v in initial.items()))
    common.save_run(args.output_dir, policy, tokenizer, args, summary)
    logger.close()
