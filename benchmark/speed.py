"""ppo.py against TRL's PPOTrainer on the CPU (benchmark/RESULTS.md's speed section says what each column measures,
and how to make TRL's environment).

    python benchmark/speed.py --updates 4 --rounds 1       # a short check (default: 4 rounds x 30 updates)
    python benchmark/speed.py table runs/bench/speed       # the section's table, from the run's results.json

`python benchmark/speed.py _NAME config.json` runs one of DRIVERS in its own process; TRL's is in trl_ppo.py.
"""

import argparse
import importlib.metadata
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # common.py, imported by the drivers (each in its own process)
SETTINGS = {"batch_size": 64, "max_new_tokens": 48, "num_ppo_epochs": 4, "num_mini_batches": 2, "kl_coef": 0.05,
            "missing_eos_score": -1.0, "temperature": 1.0, "eval_rows": 128}
LEARNING_RATE, SEED, MAX_LOAD, MAX_WAIT = 3e-4, 1, 1.5, 120  # before each run, wait (a while) for a quiet machine


def prompts_driver(cfg: dict) -> None:
    """The toy prompts' ids, encoded as ppo.py encodes them."""
    import common

    tokenizer = common.load_tokenizer(cfg["sft"])
    model = common.load_model(cfg["sft"], tokenizer)
    train_rows, test_rows = common.load_data("toy", "prompts", tokenizer, test_rows=cfg["settings"]["eval_rows"])
    limit = common.max_positions(model) - cfg["settings"]["max_new_tokens"]
    encoded = {split: common.encode_prompts(tokenizer, [r["prompt"] for r in rows], limit)
               for split, rows in (("train", train_rows), ("test", test_rows))}
    Path(cfg["result"]).write_text(json.dumps(encoded))


def eval_driver(cfg: dict) -> None:
    """A final policy sampled on the held-out toy prompts as ppo.py evaluates (common.evaluate), gold and reward."""
    import torch

    import common

    s = cfg["settings"]
    tokenizer = common.load_tokenizer(cfg["policy"])
    _, test_rows = common.load_data("toy", "prompts", tokenizer, test_rows=s["eval_rows"])
    policy = common.load_model(cfg["policy"], tokenizer)
    ref_policy = common.load_model(cfg["sft"], tokenizer)
    reward_model = common.TokenScores(common.load_model(cfg["reward_model"], common.load_tokenizer(cfg["reward_model"]),
                                                        "score"))
    prompts = [r["prompt"] for r in test_rows]
    queries = common.encode_prompts(tokenizer, prompts, common.max_positions(policy) - s["max_new_tokens"])

    def score(_, queries, query_mask, responses, response_mask):
        return common.last_token_scores(reward_model, torch.cat([queries, responses], 1),
                                        torch.cat([query_mask, response_mask], 1))

    metrics, samples = common.evaluate(policy, ref_policy, tokenizer, prompts, queries, score, s["max_new_tokens"],
                                       s["temperature"])
    Path(cfg["result"]).write_text(json.dumps(metrics | common.gold_metrics(samples)))


DRIVERS = {"_prompts": prompts_driver, "_eval": eval_driver}


def run(cmd: list, log: Path) -> None:
    """Run a command, its output to `log`; exit with the log's last lines if it fails."""
    print("$ " + shlex.join(str(c) for c in cmd), flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(True)[-15:])
        sys.exit(f"failed (exit {done.returncode}); the end of {log}:\n{tail}")


def driver(python: str, name: str, cfg: dict, work: Path, log: Path) -> dict:
    """Run one of DRIVERS (or TRL's, `_trl`, from trl_ppo.py) in its own process; return what it wrote."""
    cfg = cfg | {"result": str(work / f"{log.stem}.json")}
    (work / f"{log.stem}.config.json").write_text(json.dumps(cfg, indent=1))
    script = Path(__file__).with_name("trl_ppo.py") if name == "_trl" else __file__
    run([python, script, name, str(work / f"{log.stem}.config.json")], log)
    return json.loads(Path(cfg["result"]).read_text())


def models(work: Path) -> tuple[str, str]:
    """The SFT and reward model, trained with every default into work/models-toy-cpu once, then reused."""
    folder = work / "models-toy-cpu"
    folder.mkdir(parents=True, exist_ok=True)
    sft, rm, flags = folder / "sft", folder / "reward_model", ["--device", "cpu", "--overwrite"]
    if not (sft / "summary.json").exists():
        (rm / "summary.json").unlink(missing_ok=True)  # a reward model from another SFT model
        run([sys.executable, "sft.py", "--model_name_or_path", "toy", "--output_dir", sft, *flags], folder / "sft.log")
    if not (rm / "summary.json").exists():
        run([sys.executable, "reward_model.py", "--model_name_or_path", sft, "--output_dir", rm, *flags],
            folder / "reward_model.log")
    return str(sft), str(rm)


def ppo_run(args, sft: str, rm: str, seed: int, out: Path) -> dict:
    """ppo.py as it is, evaluation and checkpoints off: times from metrics.jsonl, peak memory from summary.json."""
    cmd = [sys.executable, "ppo.py", f"--sft_model_path={sft}", f"--reward_model_path={rm}", f"--output_dir={out}",
           "--overwrite", "--device=cpu", f"--seed={seed}", f"--learning_rate={LEARNING_RATE}",
           f"--total_episodes={args.updates * SETTINGS['batch_size']}", "--eval_every=1000000",
           "--save_every=1000000", *(f"--{k}={v}" for k, v in SETTINGS.items())]
    run(cmd, out.parent / f"{out.name}.log")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [{"wall": m["time"] - before["time"], "generation": m["time/generation"], "scoring": m["time/scoring"],
                "training": m["time/training"], "length": m["response/length"],
                "tokens": m["tokens_per_second"] * m["time/generation"]}
               for before, m in itertools.pairwise(lines) if "time/generation" in m]
    peak = json.loads((out / "summary.json").read_text())["peak_memory_mb"]
    return {"updates": updates, "peak_memory_mb": peak, "policy": str(out)}


def summarize(result: dict) -> dict:
    """A run's medians over updates 2..N (all of them if there is one)."""
    kept = result["updates"][1:] or result["updates"]
    row = {k: statistics.median(u[k] for u in kept) for k in ("wall", "generation", "scoring", "training", "length")}
    row["other"] = statistics.median(u["wall"] - u["generation"] - u["scoring"] - u["training"] for u in kept)
    row["tokens_per_s"] = sum(u["tokens"] for u in kept) / sum(u["generation"] for u in kept)
    return row | {"peak_memory_mb": result["peak_memory_mb"], **result.get("eval", {})}


def cell(values: list[float], fmt: str = ".2f") -> str:
    """Median, with the range over rounds when there are several."""
    mid = format(statistics.median(values), fmt)
    if len(values) == 1 or min(values) == max(values):
        return mid
    return f"{mid} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(work: Path) -> str:
    """The measurement's conditions, then a row per implementation (medians over rounds), from work/results.json."""
    saved = json.loads((work / "results.json").read_text())
    info, results, args = saved["info"], saved["results"], saved["args"]
    v = info["trl_versions"]
    widths = [u["width"] for r in results["trl"] for u in r["updates"][1:] or r["updates"]]
    measured = (
        f"Measured {info['date']} at commit {info['commit']} on {info['machine']}; load average at start: "
        f"`{info['load']}`; 1-minute load before each run: {info['loads_before_runs']}. ppo.py: torch "
        f"{info['torch']}, transformers {info['transformers']}; TRL {v['trl']}: torch {v['torch']}, transformers "
        f"{v['transformers']}. {args['rounds']} round(s) of {args['updates']} updates; TRL's batches held "
        f"{statistics.mean(widths):.1f} response tokens on average.")
    names = {"trl": f"TRL {v['trl']} PPOTrainer", "ppo": "ppo.py"}  # not the "floor" runs of 3bde219's speed.py
    trl = statistics.median(summarize(r)["wall"] for r in results["trl"])
    head = ("| | s/update | ratio to TRL | generation s | scoring s | training s | other s | generated tokens/s | "
            "peak memory MB | final gold | final reward | final KL | response length |")
    lines = [textwrap.fill(measured, 100), "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, label in names.items():
        runs = [summarize(r) for r in results[name]]
        col = {k: [r[k] for r in runs] for k in runs[0]}
        cells = [cell(col["wall"]), f"{statistics.median(col['wall']) / trl:.2f}x",
                 *(cell(col[k]) for k in ("generation", "scoring", "training", "other")),
                 cell(col["tokens_per_s"], ".0f"), cell(col["peak_memory_mb"], ".0f"),
                 *(cell(col[k]) for k in ("gold", "reward", "kl")), cell(col["length"], ".1f")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=30, help="PPO updates per run")
    p.add_argument("--rounds", type=int, default=4, help="rounds of one run each of TRL and ppo.py")
    p.add_argument("--trl_python", default="/tmp/trl-venv/bin/python", help="the python of TRL's environment")
    p.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "bench" / "speed")
    args = p.parse_args()
    if args.updates < 1 or args.rounds < 1:
        p.error("--updates and --rounds must be positive")
    if not Path(args.trl_python).exists():
        p.error(f"no {args.trl_python}: make TRL's environment (benchmark/RESULTS.md's speed section)")
    cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("model name")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    info = {"date": time.strftime("%Y-%m-%d"), "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
            "commit": commit.stdout.strip() or "?", "machine": f"{os.cpu_count()} CPU cores ({cpu[0] if cpu else '?'})",
            **{name: importlib.metadata.version(name) for name in ("torch", "transformers")}}
    print(f"load average at start: {info['load']}", flush=True)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    sft, rm = models(work)
    base = {"sft": sft, "reward_model": rm, "settings": SETTINGS, "updates": args.updates,
            "learning_rate": LEARNING_RATE}
    driver(sys.executable, "_prompts", base, work, work / "prompts.log")  # writes work/prompts.json
    base["prompts"] = str(work / "prompts.json")
    results, loads = {"trl": [], "ppo": []}, []
    for r in range(1, args.rounds + 1):
        folder, seed = work / f"round{r}", SEED + r - 1
        folder.mkdir(exist_ok=True)
        for name in ("trl", "ppo") if r % 2 else ("ppo", "trl"):
            deadline = time.time() + MAX_WAIT
            while (load := os.getloadavg()[0]) >= MAX_LOAD and time.time() < deadline:
                time.sleep(5)
            loads.append(round(load, 2))
            print(f"round {r}: {name} (1-minute load {load:.2f})", flush=True)
            cfg = base | {"seed": seed, "out": str(folder / name)}
            if name == "trl":
                result = driver(args.trl_python, "_trl", cfg, folder, folder / "trl.log")
            else:
                result = ppo_run(args, sft, rm, seed, folder / "ppo")
            result["eval"] = driver(sys.executable, "_eval", cfg | {"policy": result["policy"]}, folder,
                                    folder / f"{name}_eval.log")
            results[name].append(result)
            print(f"  {json.dumps({k: round(v, 3) for k, v in summarize(result).items()})}", flush=True)
    info |= {"loads_before_runs": loads, "trl_versions": results["trl"][0]["versions"]}
    saved = {"info": info, "args": vars(args), "results": results}
    (work / "results.json").write_text(json.dumps(saved, indent=1, default=str))
    print("\n" + table(work))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in DRIVERS:
        DRIVERS[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
    elif len(sys.argv) == 3 and sys.argv[1] == "table":
        print(table(Path(sys.argv[2])))
    else:
        main()
