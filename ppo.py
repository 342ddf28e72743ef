"""PPO for language models, as in InstructGPT (Ouyang et al. 2022), with the implementation details
of "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024).

One iteration: sample responses to a batch of prompts, score them, turn the score into per-token
rewards with a KL penalty to the frozen SFT model, estimate advantages with GAE and a value model,
then take several epochs of clipped policy and value updates on shuffled minibatches.

    python ppo.py                                     # learned reward model (runs/reward_model)
    python ppo.py --reward length --target_length 20  # exact golden length reward: a PPO sanity check
    python ppo.py --reward gold                       # the toy world's true reward
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
    reward: Literal["model", "gold", "length"] = "model"
    """`model`: the reward model; `gold`: the toy world's true reward; `length`: 1 - |n/N - 1|"""
    reward_model_path: str = "runs/reward_model"
    """the reward model (with --reward model); it also initializes the value model"""
    target_length: int = 20
    """N, the target response length in tokens for --reward length"""
    dataset_name: str = "toy"
    """prompts: `toy`, a hub id, or a local .json/.jsonl/.parquet file or `save_to_disk` folder"""
    dataset_config: str | None = None
    """dataset configuration name on the hub"""
    dataset_train_split: str = "train"
    """split whose prompts are used for training"""
    dataset_test_split: str = "test"
    """split whose prompts are used for evaluation"""
    output_dir: str = "runs/ppo"
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
    """prompts (and responses) per PPO iteration, over all processes (each takes an equal share)"""
    num_mini_batches: int = 2
    """minibatches per PPO epoch (each process splits its share into this many)"""
    num_ppo_epochs: int = 4
    """optimization epochs over each batch of rollouts"""
    micro_batch_size: int | None = None
    """rows of one forward/backward pass on one process: gradients accumulate over a minibatch's micro-batches and
    the rollout's no-grad passes run in chunks of it (memory, not results); None: the whole minibatch"""
    gradient_checkpointing: bool = False
    """recompute the trained models' activations in the backward pass (less memory, more compute)"""
    learning_rate: float = 3e-4
    """Adam learning rate of policy and value model, decayed linearly to 0"""
    max_new_tokens: int = 48
    """response length limit"""
    max_prompt_length: int = 512
    """prompts longer than this many tokens lose their start (also cut to fit the model's positions)"""
    temperature: float = 1.0
    """sampling temperature (log-probs are computed with the same temperature)"""
    kl_coef: float = 0.05
    """beta: each response token's reward is -beta (log pi(a_t) - log pi_ref(a_t)), the score added at the last one
    (the initial beta with --adaptive_kl)"""
    adaptive_kl: bool = False
    """adapt beta to keep the KL near --kl_target (Ziegler et al. 2019)"""
    kl_target: float = 6.0
    """target KL (nats per sequence) for the adaptive controller"""
    kl_horizon: int = 10000
    """horizon (episodes) of the adaptive controller"""
    missing_eos_score: float | None = -1.0
    """the score that replaces that of a response with no EOS within the limit (N+'s EOS trick; TRL's
    --missing_eos_penalty subtracts instead); None: keep its score"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip epsilon"""
    cliprange_value: float = 0.2
    """value clip range around the rollout's values"""
    vf_coef: float = 0.1
    """value loss coefficient"""
    length_penalty: float = 0.0
    """sigma: add sigma * (1 - len/N) to the score, N = --target_length (Singhal et al. 2023)"""
    omit_long: bool = False
    """replace each rollout without EOS by a random EOS-terminated one of the batch (Singhal et al.);
    silences --missing_eos_score. Training logs then describe the kept rollouts, except eos_rate"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (scale only) before GAE"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
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
                                      "learning_rate", "max_new_tokens", "temperature", "kl_target", "kl_horizon",
                                      "cliprange", "cliprange_value", "max_grad_norm", "eval_every", "eval_rows",
                                      "target_length", "save_every", "micro_batch_size", "max_prompt_length"),
                      nonnegative=("kl_coef", "gamma", "lam", "vf_coef", "length_penalty"))
    if args.total_episodes < args.batch_size:
        common.fail(f"--total_episodes {args.total_episodes} must be at least --batch_size {args.batch_size}")
    if args.batch_size % (world_size * args.num_mini_batches):
        common.fail(f"--batch_size {args.batch_size} must be divisible by {world_size} processes x "
                    f"--num_mini_batches {args.num_mini_batches}")


# ---------------------------------------------------------------------------------------------
# The math. Shapes: B responses, R response tokens (right-padded; mask is 1 up to the first EOS).
# ---------------------------------------------------------------------------------------------


masked_mean = common.masked_mean  # mean over the entries where mask is 1, of every process's batch


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance of x over the masked entries of the whole batch (all processes)."""
    mean = common.all_mean(masked_mean(x, mask))
    return mean, common.all_mean(masked_mean((x - mean) ** 2, mask))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries of the whole batch (all processes); with
    shift_mean=False the mean is added back."""
    mean, var = masked_mean_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the batch's response tokens (CleanRL's val/explained_variance)."""
    return 1 - masked_mean_var(returns - values, mask)[1] / masked_mean_var(returns, mask)[1].clamp(min=1e-8)


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         response_mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -beta * (log pi(a_t) - log pi_ref(a_t)), plus the sequence score on the last response
    token (its EOS, or the last token when there is none). scores (B,), logprobs, ref_logprobs, response_mask (B, R)
    -> rewards (B, R), kl (B, R): the k1 estimator per token, 0 on padding."""
    kl = (logprobs - ref_logprobs) * response_mask
    rewards = -kl_coef * kl
    last = response_mask.sum(-1).long() - 1  # index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016): delta_t = r_t + gamma V(t+1) - V(t),
    A_t = delta_t + gamma lam A_{t+1}, returns = A + V. rewards, values, response_mask (B, R) -> advantages, returns
    (B, R). The value after the last real token is 0 (the episode ends); padding has 0 reward and 0 value."""
    values = values * response_mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * response_mask
    return advantages, (advantages + values) * response_mask


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


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   response_mask: torch.Tensor, cliprange_value: float,
                   count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: L = 0.5 mean_t max((V - R)^2, (V_clip - R)^2),
    V_clip = V_old + clip(V - V_old, -eps, eps). All inputs (B, R) -> loss, clip fraction; `count` as above."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses, losses_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), response_mask, count)
    return loss, masked_mean((losses_clipped > losses).float(), response_mask, count)


class AdaptiveKLController:
    """beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon), Ziegler et al. 2019."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_episodes: int) -> None:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_episodes / self.horizon


def omit_long(ended: torch.Tensor, *rows):
    """Replace each rollout without EOS by a random EOS-terminated one of the batch ("omitting long
    outputs", Singhal et al. 2023), keeping the batch size. ended (B,); rows: tensors or lists of B."""
    if not ended.any():
        return rows
    done = ended.nonzero().squeeze(-1)
    keep = torch.where(ended, torch.arange(len(ended), device=ended.device),
                       done[torch.randint(len(done), ended.shape, device=ended.device)])
    return [r[keep] if isinstance(r, torch.Tensor) else [r[i] for i in keep.tolist()] for r in rows]


@torch.no_grad()
def get_scores(prompts: list[str], queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor,
               response_mask: torch.Tensor, *, reward: str, tokenizer, device: torch.device, target_length: int,
               reward_model=None, rm_tokenizer=None, same_vocab: bool = True) -> torch.Tensor:
    """The score of each response (B,): the reward model's at its last real token, its EOS (N+; without the
    policy's vocabulary it reads the text, retokenized); the toy world's gold reward; or the golden length reward."""
    if reward == "gold":
        texts = common.decode_responses(tokenizer, responses, response_mask)
        return torch.tensor([common.gold_reward(p, t) for p, t in zip(prompts, texts)], device=device)
    if reward == "length":
        n_tokens = common.response_length(responses, response_mask, common.stop_ids(tokenizer))
        return common.length_reward(n_tokens, target_length)
    return common.reward_model_scores(reward_model, prompts, queries, query_mask, responses, response_mask, tokenizer,
                                      rm_tokenizer, same_vocab, device)


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    check_args(args, common.world_size())
    device, rank, world_size = common.setup(args)
    num_iterations = args.total_episodes // args.batch_size
    local_batch_size = args.batch_size // world_size  # this process's share of each batch of rollouts
    minibatch_size = local_batch_size // args.num_mini_batches
    micro_batch_size = min(args.micro_batch_size or minibatch_size, minibatch_size)  # rows per forward pass
    toy = args.dataset_name == common.TOY

    # ---- data, and models: policy, frozen reference, reward model, value model ----
    hint = "run `python sft.py` first or pass --sft_model_path"
    tokenizer = common.load_tokenizer(args.sft_model_path, hint)
    train_rows, test_rows = common.load_data(args.dataset_name, "prompts", tokenizer, args.dataset_config,
                                             args.dataset_train_split, args.dataset_test_split, args.eval_rows)
    policy = common.load_model(args.sft_model_path, tokenizer, hint=hint, device=device,
                               gradient_checkpointing=args.gradient_checkpointing)
    # prompts are cut from the left so that prompt + response fit the model's positions
    max_prompt_tokens = min(args.max_prompt_length, common.max_positions(policy) - args.max_new_tokens)
    train_queries = common.encode_prompts(tokenizer, [r["prompt"] for r in train_rows], max_prompt_tokens)
    test_queries = common.encode_prompts(tokenizer, [r["prompt"] for r in test_rows], max_prompt_tokens)
    ref_policy = common.load_model(args.sft_model_path, tokenizer, hint=hint, device=device, frozen=True)
    value_init = args.sft_model_path
    reward_model, rm_tokenizer, same_vocab = None, None, True  # no reward model with --reward gold or length
    if args.reward == "model":
        hint = "run `python reward_model.py` first or pass --reward_model_path"
        rm_tokenizer = common.load_tokenizer(args.reward_model_path, hint)
        reward_model = common.TokenScores(common.load_model(args.reward_model_path, rm_tokenizer, "score", hint,
                                                            device, frozen=True))
        same_vocab = rm_tokenizer.get_vocab().items() >= tokenizer.get_vocab().items()  # a saved RM may add a pad
        # N+: the value model starts from the reward model, which already reads quality (if it reads our token ids)
        value_init = args.reward_model_path if same_vocab else value_init
    value_model = common.TokenScores(common.load_model(value_init, tokenizer, "score", device=device,
                                                       gradient_checkpointing=args.gradient_checkpointing))
    policy, value_model = (common.distribute(m, device, args.fsdp) for m in (policy, value_model))
    optimizer = torch.optim.AdamW([*policy.parameters(), *value_model.parameters()], lr=args.learning_rate, eps=1e-5,
                                  weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / num_iterations)
    derived = {"num_iterations": num_iterations, "local_batch_size": local_batch_size,
               "minibatch_size": minibatch_size, "micro_batch_size": micro_batch_size}
    run = common.Run(args, {"policy": policy, "value_model": value_model, "optimizer": optimizer,
                            "scheduler": scheduler}, derived)
    kl_ctl = AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
    rng, order, initial, start = random.Random(args.seed), [], None, 1  # the loop's state, fresh or resumed
    if run.resumed:
        rng, order, kl_ctl, initial, start = (run.resumed[k] for k in ("rng", "order", "kl_ctl", "initial", "step"))
        start += 1

    score_fn = partial(get_scores, reward=args.reward, tokenizer=tokenizer, device=device,
                       target_length=args.target_length, reward_model=reward_model, rm_tokenizer=rm_tokenizer,
                       same_vocab=same_vocab)  # (prompts, queries, query_mask, responses, response_mask) -> (B,)

    def evaluate(step: int, greedy: bool = False) -> tuple[dict, list[dict]]:
        metrics, samples = common.evaluate(policy, ref_policy, tokenizer, [r["prompt"] for r in test_rows],
                                           test_queries, score_fn, args.max_new_tokens, args.temperature, greedy,
                                           micro_batch_size=micro_batch_size)
        if args.reward == "length":  # mean |n - N| / N, and the share within 10% of N
            errors = [abs(s["length"] - args.target_length) / args.target_length for s in samples]
            metrics |= {"length_error": sum(errors) / len(errors),
                        "within_10pct": sum(e <= 0.1 for e in errors) / len(errors)}
        if toy:
            metrics |= common.gold_metrics(samples)
        prefix = "eval_greedy" if greedy else "eval"
        run.log({f"{prefix}/{k}": v for k, v in metrics.items()} | {"episode": step * args.batch_size}, step)
        return metrics, samples

    if initial is None:
        initial = evaluate(0)
    for iteration in common.progress(range(start, num_iterations + 1), desc="ppo", initial=start - 1,
                                     total=num_iterations):
        # ---- 1. rollout: sample a response to each prompt of this process's share of the batch ----
        t0 = time.time()
        common.phase_peak(device, "idle")  # on CUDA, each phase's peak GPU memory is logged from here
        while len(order) < args.batch_size:  # epochs over the shuffled training prompts
            order += rng.sample(range(len(train_rows)), len(train_rows))
        batch, order = order[:args.batch_size][rank::world_size], order[args.batch_size:]
        prompts = [train_rows[i]["prompt"] for i in batch]
        queries, query_mask = (t.to(device) for t in common.pad([train_queries[i] for i in batch],
                                                                 tokenizer.pad_token_id, "left"))
        policy.eval()  # generation keeps its KV cache (gradient checkpointing acts in train mode only)
        value_model.eval()
        with torch.no_grad(), common.autocast(device):
            # The generation's own logits give the old log-probs, read step by step: no extra policy forward pass.
            responses, response_mask, ended, logprobs = common.generate(policy, queries, query_mask, tokenizer,
                                                                        args.max_new_tokens, args.temperature)
            eos_rate = ended.float().mean().item()  # of the samples, before --omit_long replaces rows
            if args.omit_long:
                queries, query_mask, responses, response_mask, ended, logprobs, prompts = omit_long(
                    ended, queries, query_mask, responses, response_mask, ended, logprobs, prompts)
            t1, memory = time.time(), common.phase_peak(device, "generation")

            # ---- 2. score the responses; reference log-probs and values of the rollout (in micro-batches) ----
            scores = common.in_chunks(score_fn, micro_batch_size, prompts, queries, query_mask, responses,
                                      response_mask)
            context_len = queries.shape[1]
            query_response = torch.cat([queries, responses], 1)
            attention_mask = torch.cat([query_mask, response_mask], 1)
            ref_logprobs = common.in_chunks(partial(common.response_logprobs, ref_policy, context_len=context_len,
                                                    temperature=args.temperature),
                                            micro_batch_size, query_response, attention_mask)
            # V(s_t), the value of the state before response token t, is read one position earlier
            values = common.in_chunks(value_model, micro_batch_size, query_response,
                                      attention_mask)[:, context_len - 1:-1]
        raw_scores = scores.float()
        lengths = common.response_length(responses, response_mask, common.stop_ids(tokenizer)).float()
        if args.length_penalty:  # Singhal et al.: sigma * (1 - len/N)
            scores = scores + args.length_penalty * (1 - lengths / args.target_length)
        if args.missing_eos_score is not None:  # N+ "EOS trick"
            scores = torch.where(ended, scores, scores.new_tensor(args.missing_eos_score))
        response_mask = response_mask.float()
        logprobs, ref_logprobs, values = (x.float() * response_mask for x in (logprobs, ref_logprobs, values))
        t2, memory = time.time(), memory | common.phase_peak(device, "scoring")

        # ---- 3. per-token rewards with the KL penalty, GAE advantages, the adaptive KL update ----
        kl_coef = kl_ctl.value
        rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, response_mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, response_mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, response_mask)
        kl_sum = kl.sum(-1)
        if args.adaptive_kl:
            kl_ctl.update(common.all_mean(kl_sum.mean()).item(), args.batch_size)

        # ---- 4. PPO epochs over shuffled minibatches, each in micro-batches whose gradients add up ----
        stats = []
        policy.train()  # dropout is off: train mode changes nothing but lets gradient checkpointing act
        value_model.train()
        for _ in range(args.num_ppo_epochs):
            for mb in torch.randperm(local_batch_size, device=device).split(minibatch_size):
                mb_tokens = response_mask[mb].sum()  # every loss is a mean over the whole minibatch's tokens
                micro_batches, mb_stats = mb.split(micro_batch_size), {}
                for i, micro in enumerate(micro_batches):
                    ids, mask = query_response[micro], attention_mask[micro]
                    with common.grad_sync(policy, value_model, sync=i == len(micro_batches) - 1):
                        with common.autocast(device):
                            new_logprobs = common.response_logprobs(policy, ids, mask, context_len, args.temperature)
                            new_values = value_model(ids, mask)[:, context_len - 1:-1]
                        pg_loss, pg_stats = ppo_policy_loss(new_logprobs, logprobs[micro], advantages[micro],
                                                            response_mask[micro], args.cliprange, mb_tokens)
                        vf_loss, vf_clipfrac = ppo_value_loss(new_values, values[micro], returns[micro],
                                                              response_mask[micro], args.cliprange_value, mb_tokens)
                        loss = pg_loss + args.vf_coef * vf_loss
                        run.check_finite(iteration, loss=loss)
                        loss.backward()  # gradients add up over the micro-batches
                    for k, v in (("loss/policy_avg", pg_loss), ("loss/value_avg", vf_loss),
                                 ("policy/clipfrac_avg", pg_stats["clipfrac"]),
                                 ("policy/approxkl_avg", pg_stats["approxkl"]),
                                 ("val/ratio", pg_stats["ratio"]), ("val/clipfrac_avg", vf_clipfrac)):
                        mb_stats[k] = mb_stats.get(k, 0.0) + v.item()  # the micro-batches' shares add up too
                grad_norm = torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], args.max_grad_norm)
                run.check_finite(iteration, grad_norm=grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # no gradients held through the next rollout
                stats.append(mb_stats)
        scheduler.step()
        t3, memory = time.time(), memory | common.phase_peak(device, "training")

        # ---- 5. logging (averaged over processes), evaluation, checkpoint ----
        metrics = {
            "episode": iteration * args.batch_size,
            "objective/kl": kl_sum.mean().item(), "objective/entropy": (-logprobs).sum(-1).mean().item(),
            "objective/scores": raw_scores.mean().item(),
            "objective/rlhf_reward": (scores - kl_coef * kl_sum).mean().item(),
            **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
            "val/mean": masked_mean(values, response_mask).item(),
            "val/explained_variance": explained_variance(values, returns, response_mask).item(),
            "kl_coef": kl_coef, "lr": scheduler.get_last_lr()[0],
            "response/length": lengths.mean().item(), "response/eos_rate": eos_rate,
            "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/training": t3 - t2, **memory,
            "tokens_per_second": response_mask.sum().item() / (t1 - t0),
            "eps": local_batch_size / (t3 - t0),  # episodes per second (TRL's name), per process
        }
        if args.reward == "length":
            metrics["response/length_error"] = ((lengths - args.target_length).abs() / args.target_length).mean().item()
        if toy:
            texts = common.decode_responses(tokenizer, responses, response_mask)
            gold = common.gold_metrics([{"prompt": p, "response": t} for p, t in zip(prompts, texts)])
            metrics |= {"gold/reward": gold["gold"], "gold/well_formed": gold["well_formed"]}
        run.log(metrics, iteration)
        if iteration % args.eval_every == 0 and iteration < num_iterations:
            evaluate(iteration)
        if iteration % args.save_every == 0 and iteration < num_iterations:
            run.save(iteration, rng=rng, order=order, kl_ctl=kl_ctl, initial=initial)

    # ---- 6. final evaluation (sampled and greedy) and saving ----
    summary, samples = evaluate(num_iterations)
    greedy_metrics, _ = evaluate(num_iterations, greedy=True)
    initial_metrics, initial_samples = initial
    run.finish(policy, tokenizer, summary | {"greedy": greedy_metrics, "initial": initial_metrics},
               samples=samples, initial_samples=initial_samples)
