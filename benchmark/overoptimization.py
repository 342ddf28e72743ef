"""The reward over-optimization study's helpers (run_all.sh overoptimization): runs in `<name>_s<seed>` folders.

    python benchmark/overoptimization.py pick runs/bench/overopt/sweep        # the tuned KL coefficient
    python benchmark/overoptimization.py alignment runs/bench/overopt         # every final policy's alignment
    python benchmark/overoptimization.py table runs/bench/overopt             # markdown

ppo.py does not log rcfd.py's alignment metric, so `alignment` samples each saved policy again on the held-out
prompts and compares its reward distribution with the demonstrations' (rcfd.alignment_kl), the same for every method.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report import group_runs, header, mean_spread, row  # benchmark/report.py

import common
import rcfd

MIN_WELL_FORMED, EVAL_ROWS, BINS = 0.9, 128, 10  # pick's qualifying runs; alignment's prompts, as rcfd.py's bins
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


def pick(root: Path) -> None:
    """Print the KL coefficient whose run ended with the highest gold (well-formed enough): an oracle a real sweep
    does not have, the best case for the KL baseline."""
    results = []
    for run in sorted(p for p in root.iterdir() if (p / "summary.json").exists()):
        summary, args = json.loads((run / "summary.json").read_text()), json.loads((run / "args.json").read_text())
        results.append((args["kl_coef"], summary["gold"], summary["well_formed"]))
        print(f"kl_coef={args['kl_coef']:g} gold={summary['gold']:.3f} well_formed={summary['well_formed']:.3f} "
              f"kl={summary['kl']:.2f}", file=sys.stderr)
    eligible = [r for r in results if r[2] >= MIN_WELL_FORMED] or results
    print(f"{max(eligible, key=lambda r: r[1])[0]:g}")


@torch.no_grad()
def align(run: Path, score_fn, device: torch.device) -> dict:
    """A saved policy's rewards on the held-out prompts against the demonstrations', as rcfd.py scores them."""
    args = json.loads((run / "args.json").read_text())
    tokenizer = common.load_tokenizer(str(run))
    policy = common.load_model(str(run), tokenizer).to(device).eval()
    ref_policy = common.load_model(args["sft_model_path"], tokenizer).to(device).eval()
    _, test_rows = common.load_data(args["dataset_name"], "prompts", tokenizer, args["dataset_config"],
                                    args["dataset_train_split"], args["dataset_test_split"], EVAL_ROWS)
    max_positions = common.max_positions(policy)
    max_prompt_tokens = max_positions - args["max_new_tokens"]
    prompts = [r["prompt"] for r in test_rows]
    queries = common.encode_prompts(tokenizer, prompts, max_prompt_tokens)

    def score_texts(prompts: list[str], completions: list[str]) -> torch.Tensor:  # the prompt cut as the queries are
        queries = [common.encode_prompt(tokenizer, p)[-max_prompt_tokens:] for p in prompts]
        responses = [common.encode_completion(tokenizer, c, prompt=p)[:max_positions - len(q)]
                     for p, q, c in zip(prompts, queries, completions)]
        padded = [*common.pad(queries, tokenizer.pad_token_id, "left"),
                  *common.pad(responses, tokenizer.pad_token_id, "right")]
        return score_fn(prompts, *(t.to(device) for t in padded))[:, None].cpu()

    demo = rcfd.demo_rewards(list(range(len(test_rows))), test_rows, {}, score_texts)[:, 0]
    metrics, samples = common.evaluate(policy, ref_policy, tokenizer, prompts, queries, score_fn,
                                       args["max_new_tokens"], args["temperature"])
    rewards = torch.tensor([s["score"] for s in samples])
    return {"alignment_kl": rcfd.alignment_kl(demo, rewards, BINS), "reward": metrics["reward"],
            "reward_std": rewards.std().item(), "demo_reward": demo.mean().item(), "demo_reward_std": demo.std().item(),
            "gold": common.gold_metrics(samples)["gold"],
            "samples": [f"{s['prompt']} || {s['response']}" for s in samples[:4]]}


def alignment(root: Path, reward_model_path: str) -> None:
    """Write alignment.json into each run (skipped where there is one), with the same reward model for every run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reward_model = common.TokenScores(common.load_model(reward_model_path, common.load_tokenizer(reward_model_path),
                                                        "score")).to(device).eval()

    def score_fn(prompts, queries, query_mask, responses, response_mask) -> torch.Tensor:  # the policy's token ids
        ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
        with common.autocast(device):
            return common.last_token_scores(reward_model, ids.to(device), mask.to(device)).float()

    for runs in group_runs(root).values():
        for run in [run for run in runs if not (run / "alignment.json").exists()]:
            result = align(run, score_fn, device)
            common.write_json(run / "alignment.json", result)
            print(run.name, " ".join(f"{k}={v:.3f}" for k, v in result.items() if k != "samples"), file=sys.stderr)


def table(root: Path) -> str:
    """Held-out evaluation at every evaluated iteration, mean ± spread over seeds; the final row's alignment KL
    comes from alignment.json."""
    groups, out = group_runs(root), header("run | iteration", EVAL_KEYS)
    for name, runs in groups.items():
        evals = [{m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if "eval/reward" in m} for run in runs]
        aligned = [json.loads((r / "alignment.json").read_text())["alignment_kl"] if (r / "alignment.json").exists()
                   else None for r in runs]  # the final policies' alignment KL
        final = max(evals[0])
        for step in sorted(set.intersection(*(set(e) for e in evals))):
            columns = [aligned if k == "eval/alignment_kl" and step == final else [e[step].get(k) for e in evals]
                       for k in EVAL_KEYS.values()]
            out.append(row(name, step, *map(mean_spread, columns)))
    demo = [json.loads((r / "alignment.json").read_text()) for runs in groups.values() for r in runs
            if (r / "alignment.json").exists()]
    if demo:
        out.append(f"\nDemonstrations (held-out): proxy reward {demo[0]['demo_reward']:.2f} "
                   f"(std {demo[0]['demo_reward_std']:.2f}).")
    return "\n".join(out)


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    if not args.runs.is_dir():
        print(f"error: {args.runs} is not a folder of runs: run its study first", file=sys.stderr)
        sys.exit(2)
    if args.command == "pick":
        pick(args.runs)
    elif args.command == "alignment":
        alignment(args.runs, args.reward_model_path)
    else:
        print(table(args.runs))
