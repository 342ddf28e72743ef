"""RRHF: Rank Responses to align language models with Human Feedback (Yuan et al., 2023).

No value model, no PPO: for each query, k candidate responses from several sources are scored by a
reward; the model learns to give higher length-normalized log-probability to higher-reward
candidates (a ranking loss) while fine-tuning on the best one. It needs the policy and a reward,
plus the initial model only to sample from it or for the optional KL penalty.

    python rrhf.py                                  # toy world, after sft.py and reward_model.py
    python rrhf.py --sources online --kl_coef 0.05  # online sampling (the paper's OP-k) with a KL penalty
    python rrhf.py --rrhf_data data.jsonl --reward gold  # ready-made {query, responses, scores} rows
"""

import itertools
import json
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

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
    """split whose prompts the evaluations sample on"""
    rrhf_data: str | None = None
    """a ready-made RRHF .jsonl ({query, responses, scores} rows) to train on: its responses and scores
    replace --sources and the reward (which then only scores the evaluations)"""
    output_dir: str = "runs/rrhf"
    """where the model, args.json, metrics.jsonl, samples and summary.json go"""
    seed: int = 1
    """random seed"""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`"""
    track: bool = False
    """log to Weights & Biases"""
    fsdp: bool = False
    """under torchrun: shard the trained models across the processes (FSDP2) instead of a full copy in each (DDP)"""
    total_queries: int = 512
    """queries to train on, each with all of its candidate responses"""
    queries_per_step: int = 16
    """queries per optimizer step, over all processes (each takes an equal share)"""
    micro_batch_size: int | None = None
    """queries of one forward/backward pass on one process, each with all its candidates (RRHF ranks a query's
    candidates against each other): gradients accumulate over the step's micro-batches, and reward and evaluation
    passes run in chunks of as many rows (memory, not results); None: all of the process's queries"""
    gradient_checkpointing: bool = False
    """recompute the policy's activations in the backward pass instead of keeping them (less memory, more compute)"""
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
    max_prompt_length: int = 512
    """prompts longer than this many tokens lose their start (also cut to fit the model's positions)"""
    learning_rate: float = 1e-3
    """peak learning rate, decayed linearly to 0"""
    length_power: float = 1.0
    """exponent on |y| in the score p = sum log pi / |y|^length_power (0: the plain sum)"""
    rank_coef: float = 1.0
    """weight of the ranking loss: L = rank_coef * L_rank + L_ft"""
    kl_coef: float = 0.0
    """beta: candidates are ranked by their reward minus beta sum_t (log pi(y_t) - log pi_ref(y_t)) (the paper's fix
    for online hacking); 0: off"""
    eval_rows: int = 256
    """held-out prompts for the evaluations before and after training"""
    eval_batch_size: int = 64
    """prompts per generation batch in the evaluations (per process)"""
    save_every: int = 10
    """write a checkpoint every this many optimizer steps"""
    resume: bool = False
    """continue the run in --output_dir from its latest checkpoint"""
    overwrite: bool = False
    """replace the run in --output_dir"""


def check_args(args: Args, world_size: int) -> None:
    """fail() with a one-line error on a flag out of its range, or on flags that do not fit together."""
    common.check_args(args, positive=("target_length", "total_queries", "queries_per_step", "num_samples",
                                      "refresh_every", "temperature", "max_new_tokens", "learning_rate", "eval_rows",
                                      "eval_batch_size", "save_every", "micro_batch_size", "max_prompt_length"),
                      nonnegative=("length_power", "rank_coef", "kl_coef"))
    if args.total_queries < args.queries_per_step:
        common.fail(f"--total_queries {args.total_queries} must be at least --queries_per_step {args.queries_per_step}")
    if not (args.sources or args.rrhf_data):
        common.fail("--sources is empty: pick from online, initial, demo")
    if args.queries_per_step % world_size:
        common.fail(f"--queries_per_step {args.queries_per_step} must be divisible by the {world_size} processes")


# ---------------------------------------------------------------------------------------------
# The math. Shapes: Q queries with up to K candidates each (valid marks the real ones); N real
# candidates in all, R response tokens (right-padded; mask is 1 up to the first EOS).
# ---------------------------------------------------------------------------------------------


def sequence_scores(logprobs: torch.Tensor, response_mask: torch.Tensor, length_power: float = 1.0) -> torch.Tensor:
    """RRHF's score of a response, p_i = sum_t log pi(y_i,t | x, y_i,<t) / |y_i|^length_power
    (paper Eq. 1 with the released code's exponent; 0 gives the plain sum).

    logprobs, response_mask (N, R) -> (N,). Padding after the response does not count in |y_i|."""
    lengths = response_mask.sum(-1).clamp(min=1).float()
    return (logprobs * response_mask).sum(-1) / lengths**length_power


def ranked_pairs(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """pairs[q, i, j] = True where r_i < r_j for two real candidates i, j of query q; ties are no pair.

    rewards (Q, K) float, valid (Q, K) bool (False for padding in rows with fewer candidates) -> (Q, K, K)."""
    both = valid[:, :, None] & valid[:, None, :]
    return both & (rewards[:, :, None] < rewards[:, None, :])


def rank_loss(scores: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor,
              count: int | None = None) -> torch.Tensor:
    """RRHF's ranking loss (paper Eq. 2), L_rank = sum over pairs with r_i < r_j of max(0, p_i - p_j),
    summed over the pairs of a query and averaged over the queries of every process (the released
    code takes one query per device and averages over devices: the same loss).

    scores, rewards (Q, K), valid (Q, K) bool -> scalar. For a micro-batch of queries, `count` is the number of the
    process's queries: the micro-batches' losses then add up."""
    hinge = (scores[:, :, None] - scores[:, None, :]).clamp(min=0)  # [q, i, j] = max(0, p_i - p_j)
    per_query = (hinge * ranked_pairs(rewards, valid)).sum((1, 2))
    return common.masked_mean(per_query, torch.ones_like(per_query), count)


def finetune_loss(sum_logprobs: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor,
                  count: int | None = None) -> torch.Tensor:
    """RRHF's fine-tuning loss (paper Eq. 3), L_ft = -sum_t log pi(y_best,t | x, y_best,<t) with
    best = argmax_i r_i, averaged over the queries of every process. (The released code takes a
    per-token mean instead.)

    sum_logprobs, rewards (Q, K), valid (Q, K) bool -> scalar; `count` as in rank_loss."""
    best = rewards.masked_fill(~valid, float("-inf")).argmax(-1, keepdim=True)
    per_query = -sum_logprobs.gather(1, best).squeeze(1)
    return common.masked_mean(per_query, torch.ones_like(per_query), count)


# ---------------------------------------------------------------------------------------------
# Candidates: a response to rank, where it came from, and its reward.
# ---------------------------------------------------------------------------------------------


class Candidate(NamedTuple):
    response: list[int]  # token ids, up to and including the first EOS, if any
    source: str  # online, initial, demo or data
    reward: float | None  # None until scored


def given_candidates(row: dict, tokenizer, max_new_tokens: int, demo: bool) -> list[Candidate]:
    """The candidates a training row brings before any sampling, each cut to max_new_tokens: a
    ready-made RRHF row's responses with their scores (source `data`); otherwise, with the `demo`
    source, the demonstration and the rejected response of preference data, to be scored."""
    def cut(text: str) -> list[int]:
        return common.encode_completion(tokenizer, text, prompt=row["prompt"])[:max_new_tokens]

    if "responses" in row:
        return [Candidate(cut(r), "data", float(s)) for r, s in zip(row["responses"], row["scores"])]
    texts = dict.fromkeys((row.get("completion"), row.get("rejected"))) if demo else {}
    return [Candidate(cut(t), "demo", None) for t in texts if t is not None]


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


@torch.no_grad()
def get_scores(prompts: list[str], queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor,
               response_mask: torch.Tensor, *, reward: str, tokenizer, device: torch.device, target_length: int,
               reward_model: common.TokenScores | None = None, rm_tokenizer=None,
               same_vocab: bool = True) -> torch.Tensor:
    """The score of each response (B,): the reward model's, read at the response's last real
    token, its EOS; or the toy world's gold reward; or the golden length reward (target_length
    tokens). A reward model without the policy's vocabulary (same_vocab False) reads the text, encoded
    by rm_tokenizer. The script binds the keywords with partial(): a batch -> scores function."""
    if reward == "gold":
        texts = common.decode_responses(tokenizer, responses, response_mask)
        return torch.tensor([common.gold_reward(p, t) for p, t in zip(prompts, texts)], device=device)
    if reward == "length":
        n_tokens = common.response_length(responses, response_mask, common.stop_ids(tokenizer))
        return common.length_reward(n_tokens, target_length)
    return common.reward_model_scores(reward_model, prompts, queries, query_mask, responses, response_mask, tokenizer,
                                      rm_tokenizer, same_vocab, device)


def read_rrhf_data(path: str) -> list[dict]:
    """Rows {"query": str, "responses": [str], "scores": [float]} of the released RRHF code's format,
    as {"prompt", "responses", "scores"}."""
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
            fits = (isinstance(row, dict) and {"query", "responses", "scores"} <= row.keys()
                    and isinstance(row["query"], str) and isinstance(row["responses"], list)
                    and isinstance(row["scores"], list) and 0 < len(row["responses"]) == len(row["scores"])
                    and all(isinstance(r, str) for r in row["responses"])
                    and all(isinstance(s, int | float) and not isinstance(s, bool) for s in row["scores"]))
            if not fits:
                has = sorted(row) if isinstance(row, dict) else type(row).__name__
                common.fail(f"{path} line {n}: need a query, and responses (text) and scores (numbers) of equal, "
                            f"nonzero length (has {has})")
            rows.append({"prompt": row["query"], "responses": row["responses"], "scores": row["scores"]})
    if not rows:
        common.fail(f"{path} has no rows: one {{query, responses, scores}} object per line")
    return rows


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    check_args(args, common.world_size())
    device, rank, world_size = common.setup(args)
    num_steps = args.total_queries // args.queries_per_step
    local_queries = args.queries_per_step // world_size  # this process's share of each step's queries
    micro_batch_size = min(args.micro_batch_size or local_queries, local_queries)  # queries per forward pass
    toy = args.dataset_name == common.TOY

    # ---- data and models: the policy, a reward, the initial model (to sample from, or for the KL) ----
    hint = "run `python sft.py` first or pass --sft_model_path"
    tokenizer = common.load_tokenizer(args.sft_model_path, hint)
    train_rows, test_rows = common.load_data(args.dataset_name, "prompts", tokenizer, args.dataset_config,
                                             args.dataset_train_split, args.dataset_test_split, args.eval_rows)
    if args.rrhf_data:  # ready-made rows replace the training prompts, their responses the sources
        train_rows = read_rrhf_data(args.rrhf_data)
    sources = ("data",) if args.rrhf_data else args.sources
    sampled = [s for s in sources if s in ("online", "initial")]
    # Every row's candidates that need no sampling are made here, so that the loop has one path.
    given = [given_candidates(r, tokenizer, args.max_new_tokens, "demo" in sources) for r in train_rows]
    if not sampled and not all(given):
        common.fail(f"{sum(not g for g in given)} training rows have no demonstration to rank: add online or "
                    "initial to --sources, or use a dataset with completions")
    policy = common.load_model(args.sft_model_path, tokenizer, hint=hint, device=device,
                               gradient_checkpointing=args.gradient_checkpointing)
    # prompts are cut from the left so that prompt + response fit the model's positions
    max_prompt_tokens = min(args.max_prompt_length, common.max_positions(policy) - args.max_new_tokens)
    train_queries = common.encode_prompts(tokenizer, [r["prompt"] for r in train_rows], max_prompt_tokens)
    test_queries = common.encode_prompts(tokenizer, [r["prompt"] for r in test_rows], max_prompt_tokens)
    ref_policy = None  # needed during training only to sample from or for the KL term
    if "initial" in sources or args.kl_coef:
        ref_policy = common.load_model(args.sft_model_path, tokenizer, hint=hint, device=device, frozen=True)
    reward_model, rm_tokenizer, same_vocab = None, None, True  # no reward model with --reward gold or length
    if args.reward == "model":
        rm_hint = "run `python reward_model.py` first or pass --reward_model_path"
        rm_tokenizer = common.load_tokenizer(args.reward_model_path, rm_hint)
        reward_model = common.TokenScores(common.load_model(args.reward_model_path, rm_tokenizer, "score", rm_hint,
                                                            device, frozen=True))
        same_vocab = rm_tokenizer.get_vocab().items() >= tokenizer.get_vocab().items()  # a saved RM may add a pad
    num_models = 1 + (ref_policy is not None) + (args.reward == "model")  # held during training
    policy = common.distribute(policy, device, args.fsdp)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / num_steps)
    derived = {"num_steps": num_steps, "local_queries": local_queries, "micro_batch_size": micro_batch_size}
    run = common.Run(args, {"policy": policy, "optimizer": optimizer, "scheduler": scheduler}, derived)
    # The loop's state, fresh or resumed: the data order, the candidates sampled for the coming
    # steps (OP-k), and the evaluation before training.
    rng, order, pending, initial, start = random.Random(args.seed), [], [], None, 1
    if run.resumed:
        rng, order, pending, initial, start = (run.resumed[k] for k in ("rng", "order", "pending", "initial", "step"))
        pending = pending[rank]  # each process's own sampled candidates
        start += 1
    if common.rank() == 0:
        print(f"{num_steps} steps of {args.queries_per_step} queries, sources {', '.join(sources)}, "
              f"{num_models} model(s) in memory, on {device} x {world_size}")

    score_fn = partial(get_scores, reward=args.reward, tokenizer=tokenizer, device=device,
                       target_length=args.target_length, reward_model=reward_model, rm_tokenizer=rm_tokenizer,
                       same_vocab=same_vocab)  # (prompts, queries, query_mask, responses, response_mask) -> (B,)

    def evaluate(step: int, reference) -> tuple[dict, list[dict]]:
        metrics, samples = common.evaluate(policy, reference, tokenizer, [r["prompt"] for r in test_rows], test_queries,
                                           score_fn, args.max_new_tokens, args.temperature,
                                           batch_size=args.eval_batch_size, micro_batch_size=args.micro_batch_size)
        if args.reward == "length":  # mean |n - N| / N, and the share within 10% of N
            errors = [abs(s["length"] - args.target_length) / args.target_length for s in samples]
            metrics |= {"length_error": sum(errors) / len(errors),
                        "within_10pct": sum(e <= 0.1 for e in errors) / len(errors)}
        if toy:
            metrics |= common.gold_metrics(samples)
        run.log({f"eval/{k}": v for k, v in metrics.items()} | {"episode": step * args.queries_per_step}, step)
        return metrics, samples

    if initial is None:  # before training the policy is the initial model: its own reference
        initial = evaluate(0, common.unwrap(policy))
    for step in common.progress(range(start, num_steps + 1), desc="rrhf", initial=start - 1, total=num_steps):
        # ---- 1. every --refresh_every steps: the queries of the coming steps and their candidates ----
        # The given candidates plus k samples from each sampled source. Sampling the coming steps'
        # candidates at once from the current policy is the paper's OP-k, without a frozen copy.
        t0 = time.time()
        if not pending:
            coming_steps = min(args.refresh_every, num_steps - step + 1)
            while len(order) < coming_steps * args.queries_per_step:  # epochs over the shuffled training rows
                order += rng.sample(range(len(train_rows)), len(train_rows))
            for j in range(coming_steps):  # each step's batch of queries, of which this process takes its share
                share = order[j * args.queries_per_step:(j + 1) * args.queries_per_step][rank::world_size]
                pending.append([(i, list(given[i])) for i in share])
            order = order[coming_steps * args.queries_per_step:]
            coming = [query for share in pending for query in share]
            policy.eval()  # generation keeps its KV cache (gradient checkpointing acts in train mode only)
            for source in sampled:
                new = sample(policy if source == "online" else ref_policy, tokenizer,
                             [train_queries[i] for i, _ in coming], args.num_samples, args.max_new_tokens,
                             args.temperature, device)
                for (_, candidates), responses in zip(coming, new):
                    candidates += [Candidate(response, source, None) for response in responses]
        batch = pending.pop(0)  # this step's queries: [(row index, [Candidate, ...])]
        t1 = time.time()

        # ---- 2. score the candidates with the reward (ready-made rows come scored) ----
        flat = [(i, c) for i, candidates in batch for c in candidates]  # the N real candidates, with their row
        queries, query_mask, responses, response_mask = (t.to(device) for t in pack(
            [train_queries[i] for i, _ in flat], [c.response for _, c in flat], tokenizer.pad_token_id))
        flat_rewards = torch.tensor([0.0 if c.reward is None else c.reward for _, c in flat], device=device)  # (N,)
        todo = [n for n, (_, c) in enumerate(flat) if c.reward is None]  # all but the ready-made candidates
        # A response cut at max_new_tokens without EOS is scored like any other: its reward is
        # whatever the reward gives it (the reward model reads its last token).
        if todo:
            flat_rewards[todo] = common.in_chunks(
                score_fn, args.micro_batch_size or len(todo), [train_rows[flat[n][0]]["prompt"] for n in todo],
                queries[todo], query_mask[todo], responses[todo], response_mask[todo]).float()
        valid = torch.tensor([[j < len(candidates) for j in range(max(len(c) for _, c in batch))]
                              for _, candidates in batch], device=device)  # (Q, K)
        rewards = torch.zeros(valid.shape, device=device).masked_scatter(valid, flat_rewards)
        t2 = time.time()

        # ---- 3. the RRHF loss over all candidates of this process's queries, in micro-batches of queries (each
        # with all its candidates, which it ranks against each other) whose gradients add up ----
        ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
        scores = torch.zeros(valid.shape, device=device)  # p_i of every candidate (Q, K), for logging
        kl = torch.zeros(valid.shape, device=device) if args.kl_coef else None
        # query q's candidates are flat[bounds[q]:bounds[q + 1]]
        bounds = [0, *itertools.accumulate(len(candidates) for _, candidates in batch)]
        loss_rank = loss_ft = loss_total = 0.0
        policy.train()  # dropout is off: train mode changes nothing but lets gradient checkpointing act
        for first in range(0, len(batch), micro_batch_size):
            q = slice(first, first + micro_batch_size)  # these queries, and their candidates n of the N
            n = slice(bounds[first], bounds[min(first + micro_batch_size, len(batch))])
            with common.grad_sync(policy, sync=first + micro_batch_size >= len(batch)):
                with common.autocast(device):
                    logprobs = common.response_logprobs(policy, ids[n], mask[n], queries.shape[1])  # (n, R)
                zeros = torch.zeros(valid[q].shape, device=device)  # (q, K)
                mb_scores = zeros.masked_scatter(valid[q],
                                                 sequence_scores(logprobs, response_mask[n], args.length_power))
                sum_logprobs = zeros.masked_scatter(valid[q], sequence_scores(logprobs, response_mask[n], 0.0))
                mb_rewards = rewards[q]
                # With --kl_coef, rank by r - beta * log(pi(y) / pi_ref(y)), PPO's sequence-level KL penalty
                # (a KL estimate on the policy's own samples; on others it still favors what pi_ref likes).
                if args.kl_coef:
                    with torch.no_grad(), common.autocast(device):
                        ref_logprobs = common.response_logprobs(ref_policy, ids[n], mask[n], queries.shape[1])
                    kl[q] = zeros.masked_scatter(valid[q],
                                                 ((logprobs.detach() - ref_logprobs) * response_mask[n]).sum(-1))
                    mb_rewards = rewards[q] - args.kl_coef * kl[q]
                mb_rank = rank_loss(mb_scores, mb_rewards, valid[q], len(batch))
                mb_ft = finetune_loss(sum_logprobs, mb_rewards, valid[q], len(batch))
                loss = args.rank_coef * mb_rank + mb_ft
                run.check_finite(step, loss=loss)
                loss.backward()
            scores[q] = mb_scores.detach()
            loss_rank, loss_ft, loss_total = (loss_rank + mb_rank.item(), loss_ft + mb_ft.item(),
                                              loss_total + loss.item())
        ranking_rewards = rewards - args.kl_coef * kl if args.kl_coef else rewards
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        run.check_finite(step, grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # no gradients held through the next sampling
        scheduler.step()
        t3 = time.time()

        # ---- 4. logging (averaged over processes): losses, how well the scores already rank the
        # candidates, their rewards; checkpoint ----
        pairs = ranked_pairs(ranking_rewards, valid)
        every = torch.ones_like(flat_rewards)
        lengths = common.response_length(responses, response_mask, common.stop_ids(tokenizer)).float()
        ended = (torch.isin(responses, torch.tensor(common.stop_ids(tokenizer), device=responses.device))
                 & (response_mask == 1)).any(-1).float()
        metrics = {"episode": step * args.queries_per_step, "loss/rank": loss_rank, "loss/ft": loss_ft,
                   "loss/total": loss_total,
                   "rank/accuracy": common.masked_mean((scores[:, :, None] < scores[:, None, :]).float(), pairs).item(),
                   "objective/scores": common.masked_mean(rewards, valid).item(),
                   "objective/rlhf_reward": common.masked_mean(ranking_rewards, valid).item(),
                   "response/length": common.masked_mean(lengths, every).item(),
                   "response/eos_rate": common.masked_mean(ended, every).item(), "grad_norm": grad_norm.item(),
                   "lr": scheduler.get_last_lr()[0], "time/generation": t1 - t0, "time/scoring": t2 - t1,
                   "time/training": t3 - t2, "eps": len(batch) / (t3 - t0)}  # queries per second, per process
        if kl is not None:
            metrics["objective/kl"] = common.masked_mean(kl, valid).item()
        source_of = [c.source for _, c in flat]
        for source in sources:  # each source's mean reward: `online` is the policy's own
            is_source = torch.tensor([s == source for s in source_of], device=device)
            metrics[f"objective/scores_{source}"] = common.masked_mean(flat_rewards, is_source).item()
        if toy and "online" in sources:  # the true quality of the policy's own samples
            texts = common.decode_responses(tokenizer, responses, response_mask)
            online = [{"prompt": train_rows[i]["prompt"], "response": t}
                      for (i, _), t, s in zip(flat, texts, source_of) if s == "online"]
            gold = common.gold_metrics(online)
            metrics |= {"gold/reward": gold["gold"], "gold/well_formed": gold["well_formed"]}
        run.log(metrics, step)
        if step % args.save_every == 0 and step < num_steps:
            run.save(step, rng=rng, order=order, pending=common.gather([pending]), initial=initial)

    # ---- 5. evaluation on held-out prompts, with the same keys as ppo.py, and saving ----
    if ref_policy is None:  # the KL to the initial model needs it, though training did not
        ref_policy = common.load_model(args.sft_model_path, tokenizer, hint=hint, device=device, frozen=True)
    summary, samples = evaluate(num_steps, ref_policy)
    if common.rank() == 0:
        for s in samples[:3]:
            print(f"  prompt: {s['prompt']!r}\n  sample: {s['response']!r}")
    initial_metrics, initial_samples = initial
    run.finish(policy, tokenizer, summary | {"initial": initial_metrics, "num_models": num_models},
               samples=samples, initial_samples=initial_samples)
