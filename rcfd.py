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
setting. The calibrated reward protects only what the reward model measures: a reward model that
cannot see grammar lets the text degrade while its score stays at the demonstrations' level, and the
KL term to the SFT model is what keeps the rest of the text as it was.

    python rcfd.py                                     # calibrate the reward model (runs/reward_model)
    python rcfd.py --rewards model length             # two calibrated, whitened, summed components
    python rcfd.py --rewards gold                     # the toy world's true reward (no model needed)
"""

import random
import time
from dataclasses import dataclass
from functools import partial
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
    fsdp: bool = False
    """under torchrun: shard the trained models across the processes (FSDP2) instead of a full copy in each (DDP)"""

    total_episodes: int = 6400
    """number of sampled responses to train on"""
    batch_size: int = 64
    """prompts (and responses) per iteration, over all processes; the whitening baseline is computed over it"""
    num_mini_batches: int = 2
    """minibatches per PPO epoch (each process splits its share into this many)"""
    num_ppo_epochs: int = 4
    """optimization epochs over each batch of rollouts"""
    micro_batch_size: int | None = None
    """rows of one forward/backward pass on one process: gradients accumulate over a minibatch's micro-batches and
    the rollout's no-grad passes run in chunks of it (memory, not results); None: the whole minibatch"""
    gradient_checkpointing: bool = False
    """recompute the policy's activations in the backward pass instead of keeping them (less memory, more compute)"""
    learning_rate: float = 3e-4
    """Adam learning rate, decayed linearly to 0"""
    max_new_tokens: int = 48
    """response length limit"""
    max_prompt_length: int = 512
    """prompts longer than this many tokens lose their start (also cut to fit the model's positions)"""
    temperature: float = 1.0
    """sampling temperature (log-probs are computed with the same temperature)"""
    cliprange: float = 0.3
    """policy ratio clip epsilon (0.3 in the paper)"""
    kl_coef: float = 0.2
    """beta: the reward of a response is its calibrated reward minus beta sum_t (log pi(a_t) - log pi_ref(a_t)), in
    units of one whitened calibrated component (0 in the paper; the calibrated reward alone protects only what the
    reward measures)"""
    missing_eos_margin: float | None = 1.0
    """a response with no EOS within the limit gets the batch's lowest calibrated reward minus this margin (N+'s EOS
    trick, adapted: a whitened reward has no fixed scale for a set score); None: keep its own"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    alignment_bins: int = 10
    """histogram bins of the alignment metric KL(demonstration rewards || policy rewards)"""
    eval_every: int = 10
    """evaluate on held-out prompts every this many iterations"""
    eval_rows: int = 128
    """number of held-out prompts to evaluate on"""
    save_every: int = 10
    """write a checkpoint every this many iterations (seconds each on the toy world, minutes on a GPU)"""
    resume: bool = False
    """continue the run in --output_dir from its latest checkpoint"""
    overwrite: bool = False
    """replace the run in --output_dir"""


def check_args(args: Args, world_size: int) -> None:
    """fail() with a one-line error on a flag out of its range, or on flags that do not fit together."""
    common.check_args(args, positive=("total_episodes", "batch_size", "num_mini_batches", "num_ppo_epochs",
                                      "learning_rate", "max_new_tokens", "temperature", "cliprange", "max_grad_norm",
                                      "alignment_bins", "eval_every", "eval_rows", "target_length", "save_every",
                                      "micro_batch_size", "max_prompt_length"),
                      nonnegative=("kl_coef", "missing_eos_margin"))
    if len(set(args.rewards)) != len(args.rewards) or not args.rewards:
        common.fail(f"--rewards {' '.join(args.rewards)}: name each component once (model, gold, length, loglik)")
    if args.total_episodes < args.batch_size:
        common.fail(f"--total_episodes {args.total_episodes} must be at least --batch_size {args.batch_size}")
    if args.batch_size % (world_size * args.num_mini_batches):
        common.fail(f"--batch_size {args.batch_size} must be divisible by {world_size} processes x "
                    f"--num_mini_batches {args.num_mini_batches}")


# ---------------------------------------------------------------------------------------------
# The math. Shapes: B responses, K reward components, R response tokens (mask 1 up to the first EOS).
# ---------------------------------------------------------------------------------------------


masked_mean = common.masked_mean  # mean over the entries where mask is 1, of every process's batch


def whiten(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the batch (dim 0) of all processes, each column separately.
    (B,) or (B, K) -> same shape. Every process holds an equal share of the batch."""
    mean = common.all_mean(x.mean(0))
    var = common.all_mean(((x - mean) ** 2).mean(0))
    return (x - mean) * torch.rsqrt(var + 1e-8)


def calibrated_reward(scores: torch.Tensor, demo_scores: torch.Tensor) -> torch.Tensor:
    """The RCfD objective (Rita et al. 2024): R_CfD(x, y) = -(R(x, y) - R(x, y_demo))^2 for each
    reward component, each whitened over the batch, then summed over components.

    scores, demo_scores (B, K): component k of response y and of the prompt's demonstration -> (B,)."""
    return whiten(-(scores - demo_scores) ** 2).sum(-1)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, cliprange: float,
                    count: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective: L = mean_t max(-A ratio, -A clip(ratio, 1-eps, 1+eps)),
    ratio = pi(a_t) / pi_old(a_t). All inputs (B, R); returns the scalar loss and statistics. For a micro-batch,
    `count` is the minibatch's token count: the means are over it, so the micro-batches' losses add up."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), response_mask, count)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), response_mask, count),
             "approxkl": 0.5 * masked_mean(log_ratio ** 2, response_mask, count),
             "ratio": masked_mean(ratio, response_mask, count)}
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


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    check_args(args, common.world_size())
    device, rank, world_size = common.setup(args)
    num_iterations = args.total_episodes // args.batch_size
    local_batch_size = args.batch_size // world_size  # this process's share of each batch of rollouts
    minibatch_size = local_batch_size // args.num_mini_batches
    micro_batch_size = min(args.micro_batch_size or minibatch_size, minibatch_size)  # rows per forward pass
    toy = args.dataset_name == common.TOY

    # ---- data with demonstrations; models: policy, frozen reference, reward model ----
    hint = "run `python sft.py` first or pass --sft_model_path"
    tokenizer = common.load_tokenizer(args.sft_model_path, hint)
    # each prompt comes with its demonstration y_demo
    # (toy: an expert's, the best by gold of common.EXPERT_DRAFTS grammar samples)
    train_rows, test_rows = common.load_data(args.dataset_name, "prompts", tokenizer, args.dataset_config,
                                             args.dataset_train_split, args.dataset_test_split, args.eval_rows)
    if any(row["completion"] is None for row in train_rows + test_rows):
        common.fail(f"dataset {args.dataset_name} has prompts without a demonstration: RCfD needs a "
                    "completion (or chosen) column to calibrate to")
    policy = common.load_model(args.sft_model_path, tokenizer, hint=hint, device=device,
                               gradient_checkpointing=args.gradient_checkpointing)
    # prompts are cut from the left so that prompt + response fit the model's positions
    max_positions = common.max_positions(policy)
    max_prompt_tokens = min(args.max_prompt_length, max_positions - args.max_new_tokens)
    train_queries = common.encode_prompts(tokenizer, [r["prompt"] for r in train_rows], max_prompt_tokens)
    test_queries = common.encode_prompts(tokenizer, [r["prompt"] for r in test_rows], max_prompt_tokens)
    ref_policy = common.load_model(args.sft_model_path, tokenizer, hint=hint, device=device, frozen=True)
    if "model" in args.rewards:
        hint = "run `python reward_model.py` first or pass --reward_model_path"
        rm_tokenizer = common.load_tokenizer(args.reward_model_path, hint)
        reward_model = common.TokenScores(common.load_model(args.reward_model_path, rm_tokenizer, "score", hint,
                                                            device, frozen=True))
        same_vocab = rm_tokenizer.get_vocab().items() >= tokenizer.get_vocab().items()  # a saved RM may add a pad
    policy = common.distribute(policy, device, args.fsdp)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, eps=1e-5, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / num_iterations)
    derived = {"num_iterations": num_iterations, "local_batch_size": local_batch_size,
               "minibatch_size": minibatch_size, "micro_batch_size": micro_batch_size}
    run = common.Run(args, {"policy": policy, "optimizer": optimizer, "scheduler": scheduler}, derived)
    # the loop's state, fresh or resumed; demo_cache: row index -> its demonstration's rewards (K,)
    rng, order, demo_cache, initial, start = random.Random(args.seed), [], {}, None, 1
    if run.resumed:
        rng, order, demo_cache, initial, start = (run.resumed[k]
                                                  for k in ("rng", "order", "demo_cache", "initial", "step"))
        start += 1

    @torch.no_grad()
    def get_scores(prompts: list[str], queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor,
                   response_mask: torch.Tensor) -> torch.Tensor:
        """Every reward component of each response (B, K), in --rewards order: the reward model's
        score read at the response's last real token, its EOS (N+); the toy world's gold reward; the
        golden length reward; or `loglik`, log pi_ref(y|x) summed over the response's tokens (EOS
        included), which calibrated to a demonstration's asks for text as likely as a human's."""
        ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
        components = []
        with common.autocast(device):
            for kind in args.rewards:
                if kind == "model":
                    components.append(common.reward_model_scores(reward_model, prompts, queries, query_mask, responses,
                                                                 response_mask, tokenizer, rm_tokenizer, same_vocab,
                                                                 device))
                elif kind == "gold":
                    texts = common.decode_responses(tokenizer, responses, response_mask)
                    components.append(torch.tensor([common.gold_reward(p, t) for p, t in zip(prompts, texts)],
                                                   device=device))
                elif kind == "length":
                    n_tokens = common.response_length(responses, response_mask, common.stop_ids(tokenizer))
                    components.append(common.length_reward(n_tokens, args.target_length))
                else:  # loglik: the frozen reference policy's log-likelihood, at the sampling temperature
                    logprobs = common.response_logprobs(ref_policy, ids, mask, queries.shape[1], args.temperature)
                    components.append((logprobs * response_mask).sum(-1))
        return torch.stack([c.float() for c in components], -1)

    def score_demonstrations(prompts: list[str], completions: list[str]) -> torch.Tensor:
        """Every reward component of demonstrations (n, K), scored as a rollout is: the prompt cut as
        the policy's queries are, the completion and EOS as the response (cut to the model's positions)."""
        queries = [common.encode_prompt(tokenizer, p)[-max_prompt_tokens:] for p in prompts]
        responses = [common.encode_completion(tokenizer, c, prompt=p)[:max_positions - len(q)]
                     for p, q, c in zip(prompts, queries, completions)]
        query_ids, query_mask = common.pad(queries, tokenizer.pad_token_id, "left")
        response_ids, response_mask = common.pad(responses, tokenizer.pad_token_id, "right")
        return get_scores(prompts, query_ids.to(device), query_mask.to(device), response_ids.to(device),
                          response_mask.to(device)).cpu()

    # the held-out demonstrations' rewards: the same batches in every run, so no need to checkpoint them
    demo_batch_size = args.micro_batch_size or 64  # demonstrations scored per pass
    test_demo_scores = demo_rewards(list(range(len(test_rows))), test_rows, {}, score_demonstrations,
                                    demo_batch_size)  # (T, K)

    def evaluate(step: int, greedy: bool = False) -> tuple[dict, list[dict]]:
        eval_scores = [torch.zeros(0, len(args.rewards))]  # every component of this process's responses

        def first_component(*batch) -> torch.Tensor:
            eval_scores.append(get_scores(*batch).cpu())
            return eval_scores[-1][:, 0]

        metrics, samples = common.evaluate(policy, ref_policy, tokenizer, [r["prompt"] for r in test_rows],
                                           test_queries, first_component, args.max_new_tokens, args.temperature, greedy,
                                           micro_batch_size=micro_batch_size)
        scores = common.gather(torch.cat(eval_scores))  # (T, K) of every process, in no particular order
        for k, name in enumerate(args.rewards):
            suffix = "" if k == 0 else f"_{name}"
            metrics[f"reward{suffix}"] = scores[:, k].mean().item()
            metrics[f"reward_std{suffix}"] = scores[:, k].std().item()
            metrics[f"demo_reward{suffix}"] = test_demo_scores[:, k].mean().item()
            metrics[f"demo_reward_std{suffix}"] = test_demo_scores[:, k].std().item()
            metrics[f"alignment_kl{suffix}"] = alignment_kl(test_demo_scores[:, k], scores[:, k], args.alignment_bins)
        if "length" in args.rewards:  # mean |n - N| / N, and the share within 10% of N
            errors = [abs(s["length"] - args.target_length) / args.target_length for s in samples]
            metrics |= {"length_error": sum(errors) / len(errors),
                        "within_10pct": sum(e <= 0.1 for e in errors) / len(errors)}
        if toy:
            metrics |= common.gold_metrics(samples)
            metrics["demo_gold"] = sum(common.gold_reward(r["prompt"], r["completion"])
                                       for r in test_rows) / len(test_rows)
        run.log({f"eval{'_greedy' if greedy else ''}/{k}": v for k, v in metrics.items()}
                | {"episode": step * args.batch_size}, step)
        return metrics, samples

    if initial is None:
        initial = evaluate(0)
    for iteration in common.progress(range(start, num_iterations + 1), desc="rcfd", initial=start - 1,
                                     total=num_iterations):
        # ---- 1. rollout: sample a response to each prompt of this process's share of the batch ----
        t0 = time.time()
        common.phase_peak(device, "idle")  # on CUDA, each phase's peak GPU memory is logged from here
        while len(order) < args.batch_size:  # epochs over the shuffled training prompts
            order += rng.sample(range(len(train_rows)), len(train_rows))
        global_batch, order = order[:args.batch_size], order[args.batch_size:]
        batch = global_batch[rank::world_size]
        prompts = [train_rows[i]["prompt"] for i in batch]
        queries, query_mask = (t.to(device) for t in common.pad([train_queries[i] for i in batch],
                                                                tokenizer.pad_token_id, "left"))
        policy.eval()  # generation keeps its KV cache (gradient checkpointing acts in train mode only)
        with torch.no_grad(), common.autocast(device):
            # The generation's own logits give the old log-probs, read step by step: no extra policy forward pass.
            responses, response_mask, ended, logprobs = common.generate(policy, queries, query_mask, tokenizer,
                                                                        args.max_new_tokens, args.temperature)
            t1, memory = time.time(), common.phase_peak(device, "generation")

            # ---- 2. score every component of the responses and of their demonstrations; reference log-probs ----
            scores = common.in_chunks(get_scores, micro_batch_size, prompts, queries, query_mask, responses,
                                      response_mask)  # (B, K)
            # each process scores the new demonstrations of the whole batch, so that every process
            # holds the same cache, the one rank 0 checkpoints
            demo_scores = demo_rewards(global_batch, train_rows, demo_cache, score_demonstrations, demo_batch_size)
            demo_scores = demo_scores[rank::world_size].to(device)  # (B, K)
            context_len = queries.shape[1]
            query_response = torch.cat([queries, responses], 1)
            attention_mask = torch.cat([query_mask, response_mask], 1)
            ref_logprobs = common.in_chunks(partial(common.response_logprobs, ref_policy, context_len=context_len,
                                                    temperature=args.temperature),
                                            micro_batch_size, query_response, attention_mask)
        response_mask = response_mask.float()
        logprobs, ref_logprobs = (x.float() * response_mask for x in (logprobs, ref_logprobs))
        kl = (logprobs - ref_logprobs).sum(-1)  # (B,) k1 estimator of KL(pi || pi_ref) per sequence
        t2, memory = time.time(), memory | common.phase_peak(device, "scoring")

        # ---- 3. calibrated reward, EOS trick, KL penalty; whitened over the whole batch, the advantage ----
        rewards = calibrated_reward(scores, demo_scores)  # (B,)
        if args.missing_eos_margin is not None:
            # N+ "EOS trick", adapted: the calibrated reward is whitened, so a fixed score would have no
            # scale; a truncated response instead ranks below every response of the whole batch.
            rewards = torch.where(ended, rewards, common.gather(rewards).min() - args.missing_eos_margin)
        rewards = rewards - args.kl_coef * kl
        # No value network: the batch mean is the baseline; every token gets its sequence's advantage.
        advantages = whiten(rewards)[:, None] * response_mask  # (B, R)

        # ---- 4. PPO epochs over shuffled minibatches (policy only), each in micro-batches whose gradients add up ----
        stats = []
        policy.train()  # dropout is off: train mode changes nothing but lets gradient checkpointing act
        for _ in range(args.num_ppo_epochs):
            for mb in torch.randperm(local_batch_size, device=device).split(minibatch_size):
                mb_tokens = response_mask[mb].sum()  # every loss is a mean over the whole minibatch's tokens
                micro_batches, mb_stats = mb.split(micro_batch_size), {}
                for i, micro in enumerate(micro_batches):
                    with common.grad_sync(policy, sync=i == len(micro_batches) - 1):
                        with common.autocast(device):
                            new_logprobs = common.response_logprobs(policy, query_response[micro],
                                                                    attention_mask[micro], context_len,
                                                                    args.temperature)
                        loss, pg_stats = ppo_policy_loss(new_logprobs, logprobs[micro], advantages[micro],
                                                         response_mask[micro], args.cliprange, mb_tokens)
                        run.check_finite(iteration, loss=loss)
                        loss.backward()  # gradients add up over the micro-batches
                    for k, v in (("loss/policy_avg", loss), ("policy/clipfrac_avg", pg_stats["clipfrac"]),
                                 ("policy/approxkl_avg", pg_stats["approxkl"]), ("val/ratio", pg_stats["ratio"])):
                        mb_stats[k] = mb_stats.get(k, 0.0) + v.item()  # the micro-batches' shares add up too
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                run.check_finite(iteration, grad_norm=grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # no gradients held through the next rollout
                stats.append(mb_stats)
        scheduler.step()
        t3, memory = time.time(), memory | common.phase_peak(device, "training")

        # ---- 5. logging (averaged over processes): the usual RL metrics, and how close the rewards
        # are to the demonstrations'; evaluation; checkpoint ----
        lengths = common.response_length(responses, response_mask.long(), common.stop_ids(tokenizer)).float()
        all_scores, all_demo_scores = common.gather(scores.cpu()), common.gather(demo_scores.cpu())  # the whole batch
        metrics = {
            "episode": iteration * args.batch_size,
            "objective/kl": kl.mean().item(),
            "objective/entropy": (-logprobs).sum(-1).mean().item(),
            "objective/scores": scores[:, 0].mean().item(),
            "objective/demo_scores": demo_scores[:, 0].mean().item(),
            "objective/calibrated": -((scores[:, 0] - demo_scores[:, 0]) ** 2).mean().item(),
            "alignment/kl": alignment_kl(all_demo_scores[:, 0], all_scores[:, 0], args.alignment_bins),
            "alignment/scores_std": all_scores[:, 0].std().item(),
            "alignment/demo_scores_std": all_demo_scores[:, 0].std().item(),
            **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
            "kl_coef": args.kl_coef,
            "lr": scheduler.get_last_lr()[0],
            "response/length": lengths.mean().item(),
            "response/eos_rate": ended.float().mean().item(),
            "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/training": t3 - t2, **memory,
            "tokens_per_second": response_mask.sum().item() / (t1 - t0),
            "eps": local_batch_size / (t3 - t0),  # episodes per second (TRL's name), per process
        }
        for k, name in list(enumerate(args.rewards))[1:]:
            metrics[f"objective/scores_{name}"] = scores[:, k].mean().item()
            metrics[f"objective/demo_scores_{name}"] = demo_scores[:, k].mean().item()
            metrics[f"objective/calibrated_{name}"] = -((scores[:, k] - demo_scores[:, k]) ** 2).mean().item()
        if "length" in args.rewards:
            metrics["response/length_error"] = ((lengths - args.target_length).abs() / args.target_length).mean().item()
        if toy:
            texts = common.decode_responses(tokenizer, responses, response_mask)
            gold = common.gold_metrics([{"prompt": p, "response": t} for p, t in zip(prompts, texts)])
            metrics |= {"gold/reward": gold["gold"], "gold/well_formed": gold["well_formed"]}
        run.log(metrics, iteration)
        if iteration % args.eval_every == 0 and iteration < num_iterations:
            evaluate(iteration)
        if iteration % args.save_every == 0 and iteration < num_iterations:
            run.save(iteration, rng=rng, order=order, demo_cache=demo_cache, initial=initial)

    # ---- 6. final evaluation (sampled and greedy) and saving ----
    summary, samples = evaluate(num_iterations)
    greedy_metrics, _ = evaluate(num_iterations, greedy=True)
    initial_metrics, initial_samples = initial
    run.finish(policy, tokenizer, summary | {"greedy": greedy_metrics, "initial": initial_metrics},
               samples=samples, initial_samples=initial_samples)
