"""Aggregate the reward over-optimization study (benchmark/overoptimization.sh).

Runs live in `<name>_s<seed>` folders; runs with the same name are seeds of one configuration,
shown as mean ± spread ((max - min) / 2) over seeds.

    python benchmark/overoptimization.py pick runs/bench/overopt/sweep        # the tuned KL coefficient
    python benchmark/overoptimization.py alignment runs/bench/overopt         # final alignment of every run
    python benchmark/overoptimization.py table runs/bench/overopt             # markdown tables

`alignment` re-evaluates each run's saved policy on the held-out prompts and compares its reward
distribution with the demonstrations' (rcfd.alignment_kl): ppo.py does not log the alignment
metric, so for PPO it is known only at the end of training.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report import group_runs, mean_spread  # benchmark/report.py

import common
import rcfd

EVAL_KEYS = {"proxy reward": "eval/reward", "gold": "eval/gold", "KL": "eval/kl", "length": "eval/length",
             "well-formed": "eval/well_formed", "alignment KL": "eval/alignment_kl"}


@dataclass
class Args:
    command: tyro.conf.Positional[Literal["pick", "alignment", "table"]]
    """pick: the sweep's best KL coefficient; alignment: final alignment per run; table: markdown"""
    runs: tyro.conf.Positional[Path]
    """folder holding the `<name>_s<seed>` run folders"""
    reward_model_path: str = "runs/reward_model"
    """the reward model the runs optimized (for `alignment`)"""
    min_well_formed: float = 0.9
    """`pick`: only coefficients whose final well-formed rate is at least this qualify"""
    eval_rows: int = 128
    """`alignment`: held-out prompts to evaluate on"""
    alignment_bins: int = 10
    """`alignment`: histogram bins, as rcfd.py's --alignment_bins"""
    at: tuple[int, ...] = ()
    """`table`: iterations to show (default: every evaluated one)"""


def eval_lines(run: Path) -> dict[int, dict]:
    """The sampled-evaluation lines of metrics.jsonl by iteration (the final one included)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "eval/reward" in m}


def pick(root: Path, min_well_formed: float) -> None:
    """Print the KL coefficient whose run ended with the highest gold (well-formed enough). The gold
    reward is an oracle a real sweep does not have: this is the best case for the KL baseline."""
    results, cost = [], 0.0
    for run in sorted(p for p in root.iterdir() if (p / "summary.json").exists()):
        summary, args = json.loads((run / "summary.json").read_text()), json.loads((run / "args.json").read_text())
        wall = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["time"]
        cost += wall
        results.append((args["kl_coef"], summary["gold"], summary["well_formed"], summary["kl"]))
        print(f"kl_coef={args['kl_coef']:g} gold={summary['gold']:.3f} well_formed={summary['well_formed']:.3f} "
              f"kl={summary['kl']:.2f} wall={wall:.0f}s", file=sys.stderr)
    print(f"sweep: {len(results)} runs, {cost:.0f} s of wall time", file=sys.stderr)
    eligible = [r for r in results if r[2] >= min_well_formed] or results
    print(f"{max(eligible, key=lambda r: r[1])[0]:g}")


def reward_model_scores(tokenizer, reward_model_path: str, device: torch.device):
    """score_fn(prompts, queries, query_mask, responses, response_mask) -> (B,): the reward model's
    score read at each response's last real token, as ppo.py and rcfd.py score their rollouts."""
    rm_tokenizer = common.load_tokenizer(reward_model_path)
    reward_model = common.TokenScores(common.load_model(reward_model_path, rm_tokenizer, "score")).to(device).eval()
    same_vocab = rm_tokenizer.get_vocab().items() >= tokenizer.get_vocab().items()

    @torch.no_grad()
    def score_fn(prompts, queries, query_mask, responses, response_mask) -> torch.Tensor:
        ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
        if not same_vocab:  # a reward model with another tokenizer reads the text, encoded its way
            ids, mask = common.retokenize(prompts, responses, response_mask, tokenizer, rm_tokenizer)
        with common.autocast(device):
            return common.last_token_scores(reward_model, ids.to(device), mask.to(device)).float()
    return score_fn


def demo_score_fn(tokenizer, score_fn, max_prompt_tokens: int, max_positions: int, device: torch.device):
    """score_texts(prompts, completions) -> (n, 1) for rcfd.demo_rewards, scored as rcfd.py scores
    demonstrations: the prompt cut as the queries are, the completion and EOS as the response."""
    def score_texts(prompts: list[str], completions: list[str]) -> torch.Tensor:
        queries = [common.encode_prompt(tokenizer, p)[-max_prompt_tokens:] for p in prompts]
        responses = [common.encode_completion(tokenizer, c, prompt=p)[:max_positions - len(q)]
                     for p, q, c in zip(prompts, queries, completions)]
        (query_ids, query_mask), (response_ids, response_mask) = (
            common.pad(queries, tokenizer.pad_token_id, "left"), common.pad(responses, tokenizer.pad_token_id, "right"))
        return score_fn(prompts, query_ids.to(device), query_mask.to(device), response_ids.to(device),
                        response_mask.to(device))[:, None].cpu()
    return score_texts


@torch.no_grad()
def alignment(root: Path, reward_model_path: str, eval_rows: int, bins: int) -> None:
    """Write alignment.json into each run: the saved policy's rewards on the held-out prompts
    against its demonstrations' rewards, with the same reward model for every run. A run that
    already has one is skipped (delete the file to recompute it)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for runs in group_runs(root).values():
        for run in runs:
            if (run / "alignment.json").exists():
                continue
            args = json.loads((run / "args.json").read_text())
            tokenizer = common.load_tokenizer(str(run))
            policy = common.load_model(str(run), tokenizer).to(device).eval()
            ref_policy = common.load_model(args["sft_model_path"], tokenizer).to(device).eval()
            score_fn = reward_model_scores(tokenizer, reward_model_path, device)
            _, test_rows = common.load_data(args["dataset_name"], "prompts", tokenizer, args["dataset_config"],
                                            args["dataset_train_split"], args["dataset_test_split"], eval_rows)
            max_positions = common.max_positions(policy)
            max_prompt_tokens = max_positions - args["max_new_tokens"]
            prompts = [r["prompt"] for r in test_rows]
            queries = common.encode_prompts(tokenizer, prompts, max_prompt_tokens)

            score_texts = demo_score_fn(tokenizer, score_fn, max_prompt_tokens, max_positions, device)
            demo = rcfd.demo_rewards(list(range(len(test_rows))), test_rows, {}, score_texts)[:, 0]
            metrics, samples = common.evaluate(policy, ref_policy, tokenizer, prompts, queries, score_fn,
                                               args["max_new_tokens"], args["temperature"])
            rewards = torch.tensor([s["score"] for s in samples])
            result = {"alignment_kl": rcfd.alignment_kl(demo, rewards, bins), "reward": metrics["reward"],
                      "reward_std": rewards.std().item(), "demo_reward": demo.mean().item(),
                      "demo_reward_std": demo.std().item(), "gold": common.gold_metrics(samples)["gold"],
                      "samples": [f"{s['prompt']} || {s['response']}" for s in samples[:4]]}
            common.write_json(run / "alignment.json", result)
            print(run.name, " ".join(f"{k}={v:.3f}" for k, v in result.items() if k != "samples"), file=sys.stderr)


def table(root: Path, at: tuple[int, ...]) -> str:
    """Held-out evaluation (128 prompts, sampled) at every evaluated iteration, mean ± spread over
    seeds; the final row's alignment comes from alignment.json (the same for every method)."""
    groups = group_runs(root)
    out = ["| run | iteration | " + " | ".join(EVAL_KEYS) + " |", "|---" * (len(EVAL_KEYS) + 2) + "|"]
    for name, runs in groups.items():
        evals = [eval_lines(run) for run in runs]
        final = max(evals[0])
        for step in sorted(set.intersection(*(set(e) for e in evals)) & set(at or evals[0])):
            cells = []
            for key in EVAL_KEYS.values():
                values = [e[step].get(key) for e in evals]
                if key == "eval/alignment_kl" and step == final:
                    values = [json.loads((r / "alignment.json").read_text())["alignment_kl"]
                              if (r / "alignment.json").exists() else None for r in runs]
                cells.append(mean_spread(values))
            out.append(f"| {name} | {step} | " + " | ".join(cells) + " |")
    demo = [json.loads((r / "alignment.json").read_text()) for runs in groups.values() for r in runs
            if (r / "alignment.json").exists()]
    if demo:
        out.append(f"\nDemonstrations (held-out): proxy reward {demo[0]['demo_reward']:.2f} "
                   f"(std {demo[0]['demo_reward_std']:.2f}).")
    return "\n".join(out)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not args.runs.is_dir():
        print(f"error: {args.runs} is not a folder of runs: run benchmark/overoptimization.sh first", file=sys.stderr)
        sys.exit(2)
    if args.command == "pick":
        pick(args.runs, args.min_well_formed)
    elif args.command == "alignment":
        alignment(args.runs, args.reward_model_path, args.eval_rows, args.alignment_bins)
    else:
        print(table(args.runs, args.at))
