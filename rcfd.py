"""Reward Calibration from Demonstration (RCfD; Rita et al. 2024, "Countering Reward
Over-optimization in LLM with Demonstration-Guided Reinforcement Learning", arXiv 2404.19409).

Maximizing a learned reward over-optimizes it: the policy finds text the reward model over-scores.
RCfD does not maximize the reward; it asks each response to reach the reward of the human
demonstration for the same prompt:

    R_CfD(x, y) = -(R(x, y) - R(x, y_demo))^2

With several reward components (for example the reward model and a length reward), each calibrated
reward is whitened over the batch and the results are summed. As in the paper, the optimizer is PPO
with clip 0.3 and no value network: the sequence reward, whitened within the batch, is the advantage
of every response token. The paper uses no KL penalty; this file's default adds a small one
(`--kl_coef 0.2`, per sequence, in units of the whitened reward), and `--kl_coef 0` is the paper's
setting. The reason is measured on the toy world: without the KL term RCfD keeps the reward at the
demonstrations' level but, with a reward model that cannot see grammar, nothing stops the text from
degrading (3 seeds, 24 iterations: gold -2.2, well-formed 0.66 without it; -0.06 and 0.98 with it,
against the demonstrations' 0.18; benchmark/overoptimization.md): the calibrated reward protects
only what the reward measures.

    python rcfd.py                                     # calibrate the reward model (runs/reward_model)
    python rcfd.py --rewards model length             # two calibrated, whitened, summed components
    python rcfd.py --rewards gold                     # the toy world's true reward (no model needed)
"""

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
    """the SFT model: the initial policy and the frozen reference"""
    rewards: tuple[Literal["model", "gold", "length", "loglik"], ...] = ("model",)
    """reward components to calibrate: `model`, `gold`, `length`, `loglik` (log pi_ref(y|x)); the first is reported"""
    reward_model_path: str = "runs/reward_model"
    """the reward model (for the `model` component)"""
    target_length: int = 20
    """N, the target response length in tokens of the `length` component 1 - |n/N - 1|"""
    dataset_name: str = "toy"
    """prompts with demonstrations (a completion or chosen column): `toy`, a hub id, or a local file/folder"""
    dataset_config: str | None = None
    """dataset configuration name on the hub"""
    dataset_train_split: str = "train"
    """split whose prompts are used for training"""
    dataset_test_split: str = "test"
    """split whose prompts are used for evaluation"""
    output_dir: str = "runs/rcfd"
    """where the policy, args.json, metrics.jsonl and summary.json go"""
    seed: int = 1
    """random seed"""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`"""
    track: bool = False
    """log to Weights & Biases"""

    total_episodes: int = 6400
    """number of sampled responses to train on"""
    batch_size: int = 64
    """prompts (and responses) per iteration; the whitening baseline is computed over it"""
    num_mini_batches: int = 2
    """minibatches per PPO epoch"""
    num_ppo_epochs: int = 4
    """optimization epochs over each batch of rollouts"""
    learning_rate: float = 3e-4
    """Adam learning rate, decayed linearly to 0"""
    max_new_tokens: int = 48
    """response length limit"""
    temperature: float = 1.0
    """sampling temperature (log-probs are computed with the same temperature)"""
    cliprange: float = 0.3
    """policy ratio clip epsilon (0.3 in the paper)"""
    kl_coef: float = 0.2
    """beta: KL penalty per sequence, in units of one whitened calibrated component (0 in the paper;
    without it the toy policy's grammar degrades)"""
    missing_eos_penalty: float | None = 1.0
    """a response with no EOS gets the batch's lowest calibrated reward minus this (None: keep its own)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    alignment_bins: int = 10
    """histogram bins of the alignment metric KL(demonstration rewards || policy rewards)"""
    eval_every: int = 10
    """evaluate on held-out prompts every this many iterations"""
    eval_prompts: int = 128
    """number of held-out prompts to evaluate on"""
    length_bin: int = 5
    """bin width (tokens) of the length-stratified reward gain in the final summary"""


# ---------------------------------------------------------------------------------------------
# The math. Shapes: B responses, K reward components, R response tokens (mask 1 up to the first EOS).
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the batch (dim 0), each column separately. (B,) or (B, K) -> same shape."""
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def calibrated_reward(scores: torch.Tensor, demo_scores: torch.Tensor) -> torch.Tensor:
    """The RCfD objective (Rita et al. 2024): R_CfD(x, y) = -(R(x, y) - R(x, y_demo))^2 for each
    reward component, each whitened over the batch, then summed over components.

    scores, demo_scores (B, K): component k of response y and of the prompt's demonstration -> (B,)."""
    return whiten(-(scores - demo_scores) ** 2).sum(-1)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective: L = mean_t max(-A ratio, -A clip(ratio, 1-eps, 1+eps)),
    ratio = pi(a_t) / pi_old(a_t). All inputs (B, R); returns the scalar loss and statistics."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), response_mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
             "approxkl": 0.5 * masked_mean(log_ratio ** 2, response_mask),
             "ratio": masked_mean(ratio, response_mask)}
    return loss, stats


def alignment_kl(demo_rewards: torch.Tensor, policy_rewards: torch.Tensor, bins: int = 10,
                 eps: float = 1e-6) -> float:
    """The paper's alignment metric: KL(p_demo || p_policy) between the distributions of
    demonstration rewards and policy rewards, estimated with histograms over shared bin edges
    (`bins` equal bins from the lowest to the highest reward of either set). `eps` is added to every
    bin's probability (then renormalized) so that an empty policy bin gives a large, finite KL.

    demo_rewards (N,), policy_rewards (M,) -> a float >= 0 (0 when the histograms are equal)."""
    lo = min(demo_rewards.min().item(), policy_rewards.min().item())
    hi = max(demo_rewards.max().item(), policy_rewards.max().item())
    width = max(hi - lo, 1e-12) / bins

    def histogram(x: torch.Tensor) -> torch.Tensor:
        index = ((x.double() - lo) / width).floor().long().clamp(0, bins - 1)  # the top edge is in the last bin
        p = torch.bincount(index, minlength=bins).double() / len(x) + eps
        return p / p.sum()

    p, q = histogram(demo_rewards), histogram(policy_rewards)
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum().item()  # xlogy: 0 log 0 = 0 (with eps=0)


def demo_rewards(indices: list[int], rows: list[dict], cache: dict[int, torch.Tensor], score_fn,
                 batch_size: int = 64) -> torch.Tensor:
    """Rewards R_k(x, y_demo) of the demonstrations of rows[i] for i in indices -> (len(indices), K).

    A demonstration is scored once, the first time its prompt is drawn, and kept in `cache`
    (row index -> (K,) tensor). score_fn(prompts, completions) -> (n, K) scores text."""
    todo = sorted({i for i in indices if i not in cache})
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        scores = score_fn([rows[i]["prompt"] for i in chunk], [rows[i]["completion"] for i in chunk])
        cache.update(zip(chunk, scores.float().cpu()))
    return torch.stack([cache[i] for i in indices])


def loglik_reward_fn(ref_policy, temperature: float):
    """The `loglik` component: log pi_ref(y | x), the response's log-likelihood under the frozen SFT
    model at the sampling temperature, summed over its tokens (EOS included). Calibrated to a demonstration's, it asks for text as
    likely as a human's: the paper's sequence log-likelihood calibration. Same signature as
    common.make_reward_fn's functions: (prompts, queries, query_mask, responses, response_mask) -> (B,)."""
    @torch.no_grad()
    def reward_fn(prompts, queries, query_mask, responses, response_mask):
        ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
        logprobs, _ = common.response_logprobs(ref_policy, ids, mask, queries.shape[1], temperature)
        return (logprobs * response_mask).sum(-1)
    return reward_fn


if __name__ == "__main__":
    args = tyro.cli(Args)
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    common.require_positive(args, "batch_size", "num_mini_batches", "num_ppo_epochs", "max_new_tokens",
                            "eval_every", "target_length", "alignment_bins")
    num_iterations = args.total_episodes // args.batch_size
    if num_iterations < 1 or args.batch_size % args.num_mini_batches:
        common.fail(f"--total_episodes {args.total_episodes} must be at least --batch_size {args.batch_size}, "
                    f"which must be divisible by --num_mini_batches {args.num_mini_batches}")
    minibatch_size = args.batch_size // args.num_mini_batches
    toy = args.dataset_name == common.TOY
    if len(set(args.rewards)) != len(args.rewards) or not args.rewards:
        common.fail(f"--rewards {' '.join(args.rewards)}: name each component once (model, gold, length, loglik)")

    # ---- data with demonstrations; models: policy, frozen reference, one reward function per component ----
    hint = "run `python sft.py` first or pass --sft_model_path"
    tokenizer = common.load_tokenizer(args.sft_model_path, hint)
    # each prompt comes with its demonstration y_demo (toy: the review's true continuation)
    train_rows, test_rows = common.load_data(args.dataset_name, "prompts", tokenizer, args.dataset_config,
                                             args.dataset_train_split, args.dataset_test_split, args.eval_prompts)
    if any(row["completion"] is None for row in train_rows + test_rows):
        common.fail(f"dataset {args.dataset_name} has prompts without a demonstration: RCfD needs a "
                    "completion (or chosen) column to calibrate to")
    policy = common.load_model(args.sft_model_path, tokenizer, hint=hint).to(device)
    ref_policy = common.load_model(args.sft_model_path, tokenizer, hint=hint).to(device).eval()
    ref_policy.requires_grad_(False)
    common.disable_dropout(policy)  # N+: dropout would make the PPO ratio noisy
    reward_fns = [loglik_reward_fn(ref_policy, args.temperature) if kind == "loglik" else
                  common.make_reward_fn(kind, tokenizer, device, args.reward_model_path, args.target_length)
                  for kind in args.rewards]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, eps=1e-5, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / num_iterations)

    def score_all(prompts, queries, query_mask, responses, response_mask) -> torch.Tensor:
        """Every reward component of a batch of responses -> (B, K)."""
        return torch.stack([fn(prompts, queries, query_mask, responses, response_mask).float()
                            for fn in reward_fns], -1)

    @torch.no_grad()
    def score_texts(prompts: list[str], completions: list[str]) -> torch.Tensor:
        """Score demonstrations exactly as rollouts are scored: prompt left-padded, completion + EOS."""
        queries, query_mask = common.pad([common.encode_prompt(tokenizer, p) for p in prompts],
                                         tokenizer.pad_token_id, side="left")
        responses, response_mask = common.pad([common.encode_completion(tokenizer, c) for c in completions],
                                              tokenizer.pad_token_id, side="right")
        with common.autocast(device):
            return score_all(prompts, queries.to(device), query_mask.to(device), responses.to(device),
                             response_mask.to(device))

    train_demo_cache: dict[int, torch.Tensor] = {}
    test_demo_scores = demo_rewards(list(range(len(test_rows))), test_rows, {}, score_texts)  # (T, K)
    logger = common.Logger(args.output_dir, args, args.track)
    rng = random.Random(args.seed)
    order: list[int] = []

    def run_eval(step: int, greedy: bool = False) -> tuple[dict, list[dict]]:
        eval_scores = []  # every component of every evaluated response, in order

        def primary_reward(*batch) -> torch.Tensor:
            eval_scores.append(score_all(*batch))
            return eval_scores[-1][:, 0]

        metrics, samples = common.evaluate(policy, ref_policy, tokenizer, test_rows, primary_reward, device,
                                           args.max_new_tokens, args.temperature, greedy=greedy, toy=toy,
                                           target_length=args.target_length if "length" in args.rewards else None)
        scores = torch.cat(eval_scores).cpu()
        for k, name in enumerate(args.rewards):
            suffix = "" if k == 0 else f"_{name}"
            metrics[f"reward{suffix}"] = scores[:, k].mean().item()
            metrics[f"reward_std{suffix}"] = scores[:, k].std().item()
            metrics[f"demo_reward{suffix}"] = test_demo_scores[:, k].mean().item()
            metrics[f"demo_reward_std{suffix}"] = test_demo_scores[:, k].std().item()
            metrics[f"alignment_kl{suffix}"] = alignment_kl(test_demo_scores[:, k], scores[:, k], args.alignment_bins)
        if toy:
            metrics["demo_gold"] = sum(common.gold_reward(r["prompt"], r["completion"]) for r in test_rows) / len(test_rows)
        prefix = "eval_greedy/" if greedy else "eval/"
        logger.log({f"{prefix}{k}": v for k, v in metrics.items()} | {"episode": step * args.batch_size}, step)
        return metrics, samples

    initial_metrics, initial_samples = run_eval(0)
    common.print_samples(initial_samples)
    start = time.time()
    for iteration in common.progress(range(1, num_iterations + 1), desc="rcfd"):
        # ---- 1. rollout: sample a response to each prompt of the batch ----
        t0 = time.time()
        while len(order) < args.batch_size:  # epochs over the shuffled training prompts
            order += rng.sample(range(len(train_rows)), len(train_rows))
        indices, order = order[:args.batch_size], order[args.batch_size:]
        prompts = [train_rows[i]["prompt"] for i in indices]
        queries, query_mask = common.pad([common.encode_prompt(tokenizer, p) for p in prompts],
                                         tokenizer.pad_token_id, side="left")
        queries, query_mask = queries.to(device), query_mask.to(device)
        policy.eval()
        with torch.no_grad(), common.autocast(device):
            responses, response_mask, ended, gen_logits = common.generate(
                policy, queries, query_mask, tokenizer, args.max_new_tokens, args.temperature)
            # The generation's own logits give the old log-probs: no extra policy forward pass.
            logprobs = common.logprobs_from_logits(gen_logits, responses, args.temperature)
            del gen_logits
            t1 = time.time()

            # ---- 2. score the responses and look up their demonstrations' scores ----
            context_len = queries.shape[1]
            query_response = torch.cat([queries, responses], 1)
            attention_mask = torch.cat([query_mask, response_mask], 1)
            scores = score_all(prompts, queries, query_mask, responses, response_mask)  # (B, K)
            demo_scores = demo_rewards(indices, train_rows, train_demo_cache, score_texts).to(device)  # (B, K)
            ref_logprobs, _ = common.response_logprobs(ref_policy, query_response, attention_mask, context_len,
                                                       args.temperature)
        response_mask = response_mask.float()
        logprobs, ref_logprobs = logprobs * response_mask, ref_logprobs * response_mask
        kl = (logprobs - ref_logprobs).sum(-1)  # (B,) k1 estimator of KL(pi || pi_ref) per sequence
        t2 = time.time()

        # ---- 3. calibrated reward, EOS trick, optional KL penalty, whitened as the baseline ----
        rewards = calibrated_reward(scores, demo_scores)  # (B,)
        if args.missing_eos_penalty is not None:
            # N+ "EOS trick", adapted: the calibrated reward is whitened, so a fixed score would have no
            # scale; a truncated response instead ranks below every response of its batch.
            rewards = torch.where(ended, rewards, rewards.min() - args.missing_eos_penalty)
        rewards = rewards - args.kl_coef * kl
        # No value network: the batch mean is the baseline; every token gets its sequence's advantage.
        advantages = whiten(rewards)[:, None] * response_mask  # (B, R)

        # ---- 4. PPO epochs over shuffled minibatches (policy only) ----
        policy.train()
        stats = []
        for _ in range(args.num_ppo_epochs):
            for mb in torch.randperm(args.batch_size, device=device).split(minibatch_size):
                with common.autocast(device):
                    new_logprobs, _ = common.response_logprobs(policy, query_response[mb], attention_mask[mb],
                                                               context_len, args.temperature)
                loss, pg_stats = ppo_policy_loss(new_logprobs, logprobs[mb], advantages[mb], response_mask[mb],
                                                 args.cliprange)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                optimizer.step()
                stats.append({"loss/policy_avg": loss.item(), "policy/clipfrac_avg": pg_stats["clipfrac"].item(),
                              "policy/approxkl_avg": pg_stats["approxkl"].item(), "val/ratio": pg_stats["ratio"].item()})
        scheduler.step()
        t3 = time.time()

        # ---- 5. logging: the usual RL metrics, and how close the rewards are to the demonstrations' ----
        lengths = common.response_length(responses, response_mask.long(), tokenizer.eos_token_id).float()
        scores, demo_scores = scores.cpu(), demo_scores.cpu()
        metrics = {
            "episode": iteration * args.batch_size,
            "objective/kl": kl.mean().item(),
            "objective/entropy": (-logprobs).sum(-1).mean().item(),
            "objective/scores": scores[:, 0].mean().item(),
            "objective/demo_scores": demo_scores[:, 0].mean().item(),
            "objective/calibrated": -((scores[:, 0] - demo_scores[:, 0]) ** 2).mean().item(),
            "alignment/kl": alignment_kl(demo_scores[:, 0], scores[:, 0], args.alignment_bins),
            "alignment/scores_std": scores[:, 0].std().item(),
            "alignment/demo_scores_std": demo_scores[:, 0].std().item(),
            **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
            "kl_coef": args.kl_coef,
            "lr": scheduler.get_last_lr()[0],
            "response/length": lengths.mean().item(),
            "response/eos_rate": ended.float().mean().item(),
            "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/training": t3 - t2,
            "tokens_per_second": response_mask.sum().item() / (t1 - t0),
            "eps": args.batch_size / (t3 - t0),  # episodes per second (TRL's name)
        }
        for k, name in list(enumerate(args.rewards))[1:]:
            metrics[f"objective/scores_{name}"] = scores[:, k].mean().item()
            metrics[f"objective/demo_scores_{name}"] = demo_scores[:, k].mean().item()
            metrics[f"objective/calibrated_{name}"] = -((scores[:, k] - demo_scores[:, k]) ** 2).mean().item()
        if "length" in args.rewards:
            metrics["response/length_error"] = ((lengths - args.target_length).abs() / args.target_length).mean().item()
        if toy:
            texts = common.decode_responses(tokenizer, responses, response_mask)
            metrics["gold/reward"] = sum(map(common.gold_reward, prompts, texts)) / len(texts)
            metrics["gold/well_formed"] = sum(map(common.well_formed, prompts, texts)) / len(texts)
        logger.log(metrics, iteration)
        if iteration % args.eval_every == 0 and iteration < num_iterations:
            run_eval(iteration)

    # ---- 6. final evaluation (sampled and greedy) and saving ----
    summary, samples = run_eval(num_iterations)
    greedy_metrics, _ = run_eval(num_iterations, greedy=True)
    summary |= common.length_stratified_gain([s["reward"] for s in initial_samples], [s["length"] for s in initial_samples],
                                             [s["reward"] for s in samples], [s["length"] for s in samples], args.length_bin)
    summary |= {"greedy": greedy_metrics, "initial": initial_metrics, "train_time": round(time.time() - start, 1)}
    common.print_samples(samples)
    print("summary: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float)))
    common.save_run(args.output_dir, policy, tokenizer, args, summary)
    logger.close()
