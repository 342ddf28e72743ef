"""ppo.py against Hugging Face TRL's PPOTrainer, side by side, and the compute floor (issue 18).

The three run on the same SFT and reward model (the value model starts from the reward model), the same toy prompts
and the same settings: 64 prompts per update, at most 48 new tokens, 4 PPO epochs x 2 minibatches of 32, learning
rate 3e-4 decayed linearly to 0, AdamW eps 1e-5, KL coefficient 0.05 (k1), missing-EOS penalty -1, temperature 1,
top_k 0, top_p 1; fp32 on a CPU, bf16 autocast with fp32 weights on CUDA (ppo.py's own choice; the TRL driver runs
train() under the same autocast). One process at a time, alternately (TRL first in odd rounds, ppo.py first in even
ones), for --rounds rounds of --updates updates each.

- TRL: trl.experimental.ppo.PPOTrainer of TRL 1.9.0 (the release SPEC.md names) with transformers 5.23.0, in its own
  virtual environment (--setup_trl makes it; TRL is never a requirement of minrlhf). This file is its driver too
  (`_trl`, run by that environment's python): it times each update between TrainerCallback.on_step_end calls, and
  each phase by wrapping the trainer module's batch_generation (generation) and forward (the first forward with
  gradients starts training; between the two: reference, value and reward passes, GAE: "scoring").
- ppo.py: the script as it is (eval_every and save_every off), its time per update and per phase read from
  metrics.jsonl, its peak memory from summary.json (which covers its evaluations before and after training too).
- floor: the same model passes with no bookkeeping (`_floor`): generate 64 x 48 tokens from the SFT policy (KV
  cache; EOS held back until the 48th token, so that every update has the same, largest shape: a policy's own
  lengths would set it otherwise), log-probs from the generation's logits; reference, value and reward forwards; 8
  minibatch forward+backward passes of policy and value, AdamW steps at learning rate 0. Its batches are as wide as
  the PPO runs' can get (48 response tokens); a run whose batches end earlier can come in under it (the TRL
  driver's mean batch width is in the table's note).

Seconds per update: the wall time from one update's end to the next (everything the loop does, logging included),
the median over updates 2..N of a run (update 1 pays for warm-up), then the median over rounds with the range of the
rounds' medians. Phases: generation (sampling and the old log-probs), scoring (reward, reference and value passes,
advantages), training (the PPO epochs and, for ppo.py and TRL, their logging); ppo.py's phases are its own
time/generation, time/scoring, time/training. Peak memory: the process's peak resident memory (ru_maxrss) on a CPU,
torch.cuda.max_memory_allocated on CUDA. Final gold and reward: each final policy is sampled again on the same 128
held-out toy prompts with one fixed seed by the same code (common.evaluate, as ppo.py's final evaluation) and scored
by the toy gold reward and the reward model.

    python benchmark/speed.py --setup_trl --quick            # install TRL into /tmp/trl-venv, then a short check
    python benchmark/speed.py --write                        # 4 rounds x 30 updates, table into benchmark/RESULTS.md
    python benchmark/speed.py --device cuda --config 160m --updates 20 --rounds 2 --write   # on one GPU

A GPU machine with no network (python3 with CUDA torch, no datasets/tyro/TRL) takes the missing packages as wheels,
one environment for both sides; here: `python benchmark/speed.py --download_wheels .whl` (15 MB; .whl/ in
.git/info/exclude); there:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmark/speed.py --device cuda --config 160m --trl_python python3 --updates 20 --rounds 2
"""

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"
TRL_PINS = ("trl==1.9.0", "transformers==5.23.0")
# what TRL and the project need that a GPU machine's image lacks (or has in another version), for --download_wheels
GPU_WHEELS = (*TRL_PINS, "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "tyro==1.0.17",
              "docstring-parser==0.18.0", "typeguard==4.6.1")
SETTINGS = {"batch_size": 64, "max_new_tokens": 48, "num_ppo_epochs": 4, "num_mini_batches": 2, "kl_coef": 0.05,
            "missing_eos_penalty": -1.0, "temperature": 1.0, "eval_rows": 128}
SECTION = "## Speed: ppo.py against TRL's PPOTrainer"


# ---- the parts that run in their own processes: `speed.py _NAME config.json` ----------------------------------------

def _sync(torch) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _peak_mb(torch, device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _response_stats(torch, responses, eos_id: int) -> tuple[int, float]:
    """Generated tokens up to and including the first EOS (all of a row without one), and the mean length without
    the EOS (ppo.py's response/length)."""
    is_eos = responses == eos_id
    ended = is_eos.any(-1)
    first = torch.where(ended, is_eos.float().argmax(-1), torch.full_like(ended, responses.shape[1], dtype=torch.long))
    return int((first + ended.long()).sum()), float(first.float().mean())


def trl_driver(cfg: dict) -> None:
    """TRL's PPOTrainer on the given models and prompts (run by the TRL environment's python)."""
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"  # precision: the autocast below, as ppo.py
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"  # TRL 1.x keeps PPOTrainer in trl.experimental.ppo
    if cfg["device"] == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    import datasets
    import torch
    import transformers
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    transformers.utils.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg["sft"])
    tokenizer.padding_side = "left"
    fp32 = {"dtype": torch.float32}  # as ppo.py holds them on a CPU, whatever dtype a checkpoint was stored in
    policy = transformers.AutoModelForCausalLM.from_pretrained(cfg["sft"], **fp32)
    ref_policy = transformers.AutoModelForCausalLM.from_pretrained(cfg["sft"], **fp32)
    value_model = transformers.AutoModelForSequenceClassification.from_pretrained(cfg["reward_model"], num_labels=1,
                                                                                  **fp32)
    reward_model = transformers.AutoModelForSequenceClassification.from_pretrained(cfg["reward_model"], num_labels=1,
                                                                                   **fp32)
    prompts = json.loads(Path(cfg["prompts"]).read_text())
    train = datasets.Dataset.from_list([{"input_ids": ids} for ids in prompts["train"]])
    test = datasets.Dataset.from_list([{"input_ids": ids} for ids in prompts["test"]])
    s = cfg["settings"]
    # ppo.py's --micro_batch_size: TRL's rows per forward/backward pass and per rollout forward pass; its rollout batch
    # is per_device_train_batch_size x gradient_accumulation_steps
    micro = s.get("micro_batch_size") or s["batch_size"]
    args = PPOConfig(
        output_dir=cfg["out"], seed=cfg["seed"], learning_rate=cfg["learning_rate"], adam_epsilon=1e-5,
        per_device_train_batch_size=micro, gradient_accumulation_steps=s["batch_size"] // micro,
        num_mini_batches=s["num_mini_batches"], num_ppo_epochs=s["num_ppo_epochs"],
        total_episodes=cfg["updates"] * s["batch_size"], local_rollout_forward_batch_size=micro,
        response_length=s["max_new_tokens"], temperature=s["temperature"], kl_coef=s["kl_coef"],
        missing_eos_penalty=-s["missing_eos_penalty"],  # TRL subtracts it from the score; ppo.py sets the score to it
        stop_token="eos", num_sample_generations=0, per_device_eval_batch_size=s["batch_size"],
        bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, sft_model_path=cfg["sft"], reward_model_path=cfg["reward_model"])

    updates, current = [], {}
    generation, forward = module.batch_generation, module.forward

    def timed_generation(model, queries, *rest, **kwargs):
        current["generation_start"] = _sync(torch)
        query_responses, logits = generation(model, queries, *rest, **kwargs)
        current["generation_end"] = _sync(torch)
        current["tokens"], current["length"] = _response_stats(torch, query_responses[:, queries.shape[1]:],
                                                               tokenizer.eos_token_id)
        current["width"] = query_responses.shape[1] - queries.shape[1]
        return query_responses, logits

    def timed_forward(model, query_responses, pad_token_id):
        if torch.is_grad_enabled() and "training_start" not in current:
            current["training_start"] = _sync(torch)
        return forward(model, query_responses, pad_token_id)

    module.batch_generation, module.forward = timed_generation, timed_forward

    class Timer(transformers.TrainerCallback):
        def on_train_begin(self, *_, **__):
            current["start"] = _sync(torch)

        def on_step_end(self, *_, **__):
            now = _sync(torch)
            updates.append({"wall": now - current["start"], "tokens": current["tokens"], "length": current["length"],
                            "width": current["width"],
                            "generation": current["generation_end"] - current["generation_start"],
                            "scoring": current["training_start"] - current["generation_end"],
                            "training": now - current["training_start"]})
            current.clear()
            current["start"] = now

    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=train, eval_dataset=test,
                         callbacks=[Timer()])
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg["device"] == "cuda"
                else torch.autocast("cpu", enabled=False))
    with autocast:
        trainer.train()
    peak = _peak_mb(torch, cfg["device"])
    trainer.policy_model.save_pretrained(Path(cfg["out"]) / "policy")
    tokenizer.save_pretrained(Path(cfg["out"]) / "policy")
    Path(cfg["result"]).write_text(json.dumps({
        "updates": updates, "peak_memory_mb": peak, "threads": torch.get_num_threads(),
        "policy": str(Path(cfg["out"]) / "policy"),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}}))


def floor_driver(cfg: dict) -> None:
    """The compute floor: the model passes of a PPO update and nothing else (run by the project's python). The passes
    are written out here, so that the floor stays what it is while ppo.py's helpers change."""
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    import common

    def logprobs(model, ids, mask, context):  # log pi(token) of the response tokens: its logit minus the logsumexp
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        logits = logits[:, context - 1:-1].float()
        return logits.gather(-1, ids[:, context:, None]).squeeze(-1) - logits.logsumexp(-1)

    def scores(classifier, ids, mask):  # the scalar head at every position (value and reward model)
        hidden = classifier.base_model(input_ids=ids, attention_mask=mask,
                                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        return classifier.score(hidden).squeeze(-1).float()

    s, device = cfg["settings"], torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    tokenizer = common.load_tokenizer(cfg["sft"])
    policy = common.load_model(cfg["sft"], tokenizer).to(device)
    ref_policy = common.load_model(cfg["sft"], tokenizer).to(device).requires_grad_(False)
    reward_model = common.load_model(cfg["reward_model"], tokenizer, "score").to(device).requires_grad_(False)
    value_model = common.load_model(cfg["reward_model"], tokenizer, "score").to(device)
    optimizer = torch.optim.AdamW([*policy.parameters(), *value_model.parameters()], lr=0.0, eps=1e-5,
                                  weight_decay=0.0)  # as ppo.py's, at learning rate 0: the policy stays the SFT one
    prompts = json.loads(Path(cfg["prompts"]).read_text())["train"]
    policy.generation_config = transformers.GenerationConfig(
        max_new_tokens=s["max_new_tokens"], do_sample=True, temperature=s["temperature"], top_k=0, top_p=1.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
        output_logits=True, min_new_tokens=s["max_new_tokens"])  # every update 64 x 48: the largest shape
    n, minibatch = s["batch_size"], s["batch_size"] // s["num_mini_batches"]
    updates = []
    for update in range(cfg["updates"]):
        batch = [prompts[(update * n + i) % len(prompts)] for i in range(n)]
        queries, query_mask = (t.to(device) for t in common.pad(batch, tokenizer.pad_token_id, "left"))
        context = queries.shape[1]
        t0 = _sync(torch)
        with torch.no_grad(), common.autocast(device):
            out = policy.generate(input_ids=queries, attention_mask=query_mask)
            responses = out.sequences[:, context:]
            is_eos = (responses == tokenizer.eos_token_id).long()
            response_mask = (is_eos.cumsum(-1) - is_eos == 0).long()  # up to and including the first EOS
            logits = torch.stack(out.logits, 1).float()
            old_logprobs = logits.gather(-1, responses[..., None]).squeeze(-1) - logits.logsumexp(-1)
            tokens, length = _response_stats(torch, responses, tokenizer.eos_token_id)
            t1 = _sync(torch)
            ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
            logprobs(ref_policy, ids, mask, context)
            scores(value_model, ids, mask)
            scores(reward_model, ids, mask)
        t2 = _sync(torch)
        for _ in range(s["num_ppo_epochs"]):
            for mb in torch.randperm(n, device=device).split(minibatch):
                with common.autocast(device):
                    new_logprobs = logprobs(policy, ids[mb], mask[mb], context)
                    values = scores(value_model, ids[mb], mask[mb])[:, context - 1:-1]
                m = response_mask[mb].float()
                loss = ((new_logprobs - old_logprobs[mb]).exp() * m).mean() + (values ** 2 * m).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        t3 = _sync(torch)
        updates.append({"wall": t3 - t0, "generation": t1 - t0, "scoring": t2 - t1, "training": t3 - t2,
                        "tokens": tokens, "length": length})
    Path(cfg["result"]).write_text(json.dumps({"updates": updates, "peak_memory_mb": _peak_mb(torch, cfg["device"]),
                                               "threads": torch.get_num_threads()}))


def prompts_driver(cfg: dict) -> None:
    """The toy prompts' ids, encoded as ppo.py encodes them, for the TRL driver and the floor."""
    sys.path.insert(0, str(ROOT))
    import common

    tokenizer = common.load_tokenizer(cfg["sft"])
    model = common.load_model(cfg["sft"], tokenizer)
    train_rows, test_rows = common.load_data("toy", "prompts", tokenizer, test_rows=cfg["settings"]["eval_rows"])
    limit = common.max_positions(model) - cfg["settings"]["max_new_tokens"]
    encoded = {split: common.encode_prompts(tokenizer, [r["prompt"] for r in rows], limit)
               for split, rows in (("train", train_rows), ("test", test_rows))}
    Path(cfg["result"]).write_text(json.dumps(encoded))


def eval_driver(cfg: dict) -> None:
    """A final policy sampled on the held-out toy prompts as ppo.py's final evaluation does, scored by the gold reward
    and the reward model."""
    sys.path.insert(0, str(ROOT))
    import torch

    import common

    device, s = torch.device(cfg["device"]), cfg["settings"]
    tokenizer = common.load_tokenizer(cfg["policy"])
    _, test_rows = common.load_data("toy", "prompts", tokenizer, test_rows=s["eval_rows"])
    policy = common.load_model(cfg["policy"], tokenizer).to(device)
    ref_policy = common.load_model(cfg["sft"], tokenizer).to(device)
    reward_model = common.TokenScores(common.load_model(cfg["reward_model"], common.load_tokenizer(cfg["reward_model"]),
                                                        "score")).to(device)
    prompts = [r["prompt"] for r in test_rows]
    queries = common.encode_prompts(tokenizer, prompts, common.max_positions(policy) - s["max_new_tokens"])

    def score(_, queries, query_mask, responses, response_mask):
        with common.autocast(device):
            return common.last_token_scores(reward_model, torch.cat([queries, responses], 1),
                                            torch.cat([query_mask, response_mask], 1))

    metrics, samples = common.evaluate(policy, ref_policy, tokenizer, prompts, queries, score, s["max_new_tokens"],
                                       s["temperature"])
    Path(cfg["result"]).write_text(json.dumps(metrics | common.gold_metrics(samples)))


def padded_toy_tokenizer(size: int):
    """The toy world's tokenizer with its vocabulary padded with unused tokens to `size`, so that a model's output
    layer costs what it does at a real vocabulary (benchmark/memory.py uses it too)."""
    sys.path.insert(0, str(ROOT))
    import tokenizers
    import transformers

    import common

    toy = common.toy_tokenizer()
    words = [toy.convert_ids_to_tokens(i) for i in range(len(toy))]
    vocab = {w: i for i, w in enumerate(words + [f"<unused_{i}>" for i in range(size - len(words))])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=common.UNK))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{common.BOS} $A", special_tokens=[(common.BOS, toy.bos_token_id)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=common.PAD, bos_token=common.BOS,
                                                eos_token=common.EOS, unk_token=common.UNK, padding_side="left")


def base_driver(cfg: dict) -> None:
    """A GPT-NeoX model of Pythia-160M's shape (its config.json, written out; random weights), or the same
    architecture tiny ("160m-tiny", to check the path on a CPU), over the toy tokenizer with its vocabulary padded with
    unused tokens to the model's, so that the output layer costs what it does in Pythia."""
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers


    if cfg["config"] == "160m":  # EleutherAI/pythia-160m
        arch = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                "max_position_embeddings": 2048, "vocab_size": 50304}
    else:
        arch = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                "max_position_embeddings": 256, "vocab_size": 1024}
    tokenizer = padded_toy_tokenizer(arch["vocab_size"])
    config = transformers.GPTNeoXConfig(
        **arch, hidden_act="gelu", layer_norm_eps=1e-5, use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        attention_dropout=0.0, hidden_dropout=0.0, initializer_range=0.02, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(cfg["out"])
    tokenizer.save_pretrained(cfg["out"])
    parameters = sum(p.numel() for p in model.parameters())
    print(f"base model: {parameters / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}")
    Path(cfg["result"]).write_text(json.dumps({"parameters": parameters, "vocabulary": len(tokenizer)}))


DRIVERS = {"_trl": trl_driver, "_floor": floor_driver, "_prompts": prompts_driver, "_eval": eval_driver,
           "_base": base_driver}


# ---- the benchmark: setup, models, rounds, table ---------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup_trl", action="store_true",
                   help=f"make --venv and install {TORCH_PIN}, then {' '.join(TRL_PINS)} into it (skipped if there)")
    p.add_argument("--venv", default="/tmp/trl-venv", help="TRL's virtual environment (default /tmp/trl-venv)")
    p.add_argument("--trl_python", help="the python that runs TRL (default: --venv's); e.g. python3 on a GPU machine "
                                        "whose PYTHONPATH holds the --download_wheels wheels")
    p.add_argument("--download_wheels", metavar="DIR",
                   help="only download, for a GPU machine's python 3.12 with no network, the wheels of "
                        f"{' '.join(GPU_WHEELS)} into DIR; there: python3 -m pip install -q --no-index --no-deps "
                        "--target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site, then --trl_python python3")
    p.add_argument("--quick", action="store_true", help="smaller SFT and reward model, 4 updates, 1 round: a check")
    p.add_argument("--updates", type=int, help="PPO updates per run (default 30; --quick 4)")
    p.add_argument("--rounds", type=int, help="rounds of one run each of TRL, ppo.py, floor (default 4; --quick 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--config", default="toy", choices=("toy", "160m", "160m-tiny"),
                   help="toy: the project's 0.8M GPT-2; 160m: a GPT-NeoX of Pythia-160M's shape built here, toy "
                        "tokenizer padded to its 50,304 tokens; 160m-tiny: that path at a tiny size")
    p.add_argument("--sft_model_path", help="an SFT model to use (default: trained into --work_dir)")
    p.add_argument("--reward_model_path", help="a reward model to use (default: trained into --work_dir)")
    p.add_argument("--learning_rate", type=float, help="PPO learning rate (default 3e-4; 1e-5 for the 160m configs)")
    p.add_argument("--seed", type=int, default=1, help="round r runs with seed + r - 1")
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "bench" / "speed"))
    p.add_argument("--max_load", type=float, default=1.5, help="before each run, wait until the 1-minute load is below")
    p.add_argument("--max_wait", type=float, default=120, help="... for at most this many seconds")
    p.add_argument("--write", action="store_true", help="put the table into --results_file, replacing its section")
    p.add_argument("--results_file", default=str(ROOT / "benchmark" / "RESULTS.md"))
    args = p.parse_args()
    args.updates = args.updates or (4 if args.quick else 30)
    args.rounds = args.rounds or (1 if args.quick else 4)
    if args.learning_rate is None:
        args.learning_rate = 3e-4 if args.config == "toy" else 1e-5
    if args.updates < 1 or args.rounds < 1:
        p.error("--updates and --rounds must be positive")
    return args


def run(cmd: list[str], log: Path | None = None, **kwargs) -> None:
    """Run a command (its output to `log` if given); exit with its last lines if it fails."""
    print("$ " + shlex.join(str(c) for c in cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)
        return
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False, **kwargs)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(True)[-15:])
        sys.exit(f"failed (exit {done.returncode}); the end of {log}:\n{tail}")


def driver(python: str, name: str, cfg: dict, work: Path, log: Path) -> dict:
    """Run one of DRIVERS in its own process; return what it wrote."""
    cfg = cfg | {"result": str(work / f"{log.stem}.json")}
    (work / f"{log.stem}.config.json").write_text(json.dumps(cfg, indent=1))
    run([python, __file__, name, str(work / f"{log.stem}.config.json")], log)
    return json.loads(Path(cfg["result"]).read_text())


def setup_trl(args) -> None:
    python = Path(args.venv) / "bin" / "python"
    check = "import trl, transformers, torch; print(trl.__version__, transformers.__version__, torch.__version__)"
    found = subprocess.run([python, "-c", check], capture_output=True, text=True, check=False).stdout.split() \
        if python.exists() else []
    if found == [pin.split("==")[1] for pin in (*TRL_PINS, TORCH_PIN)]:
        print(f"{args.venv} holds {' '.join(TRL_PINS)} already")
        return
    run([sys.executable, "-m", "venv", args.venv])
    run([python, "-m", "pip", "install", "-q", TORCH_PIN])  # first, so that TRL's requirements take this torch
    run([python, "-m", "pip", "install", "-q", *TRL_PINS])


def download_wheels(folder: str) -> None:
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                             "manylinux1_x86_64", "any")]
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platforms, "-d", folder, *GPU_WHEELS])


def models(args, work: Path) -> tuple[str, str]:
    """The SFT and reward model: given, or trained here with the project's defaults (--quick: smaller) and reused."""
    if args.sft_model_path and args.reward_model_path:
        return args.sft_model_path, args.reward_model_path
    folder = work / f"models-{args.config}-{args.device}{'-quick' if args.quick else ''}"
    sft, rm = args.sft_model_path or str(folder / "sft"), args.reward_model_path or str(folder / "reward_model")
    flags = ["--device", args.device, "--overwrite"]
    sft_args, rm_args = [], []
    if args.config != "toy":  # settings of benchmark/gpu_smoke.sh for a real-sized model
        sft_args = ["--num_epochs", "2", "--learning_rate", "5e-4"]
        rm_args = ["--num_epochs", "1", "--learning_rate", "1e-4"]
    if args.quick:  # toy: 2 of SFT's 6 epochs, 1 of the reward model's 2; the 160m configs: 1000 rows, 1 epoch
        rows = ["--max_train_rows", "1000"] if args.config != "toy" else []
        sft_args = ["--num_epochs", "1" if rows else "2", *rows, *sft_args[2:]]
        rm_args = ["--num_epochs", "1", *rows, *rm_args[2:]]
    folder.mkdir(parents=True, exist_ok=True)
    recipe = json.dumps({"sft": sft_args, "reward_model": rm_args})
    if not (folder / "recipe.json").exists() or (folder / "recipe.json").read_text() != recipe:  # made otherwise
        for name in ("sft", "reward_model"):
            (folder / name / "summary.json").unlink(missing_ok=True)
    (folder / "recipe.json").write_text(recipe)
    made_sft = not args.sft_model_path and not (folder / "sft" / "summary.json").exists()
    if made_sft:
        base = "toy"
        if args.config != "toy":
            driver(sys.executable, "_base", {"config": args.config, "out": str(folder / "base")}, folder,
                   folder / "base.log")
            base = str(folder / "base")
        run([sys.executable, "sft.py", "--model_name_or_path", base, "--output_dir", sft, *sft_args, *flags],
            folder / "sft.log")
    if not args.reward_model_path and (made_sft or not (folder / "reward_model" / "summary.json").exists()):
        run([sys.executable, "reward_model.py", "--model_name_or_path", sft, "--output_dir", rm, *rm_args, *flags],
            folder / "reward_model.log")
    return sft, rm


def wait_for_quiet(args) -> float:
    """Wait (at most --max_wait s) until the 1-minute load is below --max_load; return it."""
    deadline = time.time() + args.max_wait
    while (load := os.getloadavg()[0]) >= args.max_load and time.time() < deadline:
        time.sleep(5)
    return load


def ppo_run(args, sft: str, rm: str, seed: int, out: Path) -> dict:
    s = SETTINGS
    cmd = [sys.executable, "ppo.py", f"--sft_model_path={sft}", f"--reward_model_path={rm}", f"--output_dir={out}",
           "--overwrite", f"--device={args.device}", f"--seed={seed}", f"--learning_rate={args.learning_rate}",
           f"--total_episodes={args.updates * s['batch_size']}", "--eval_every=1000000", "--save_every=1000000",
           *(f"--{k}={v}" for k, v in s.items())]
    run(cmd, out.parent / f"{out.name}.log")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [{"wall": m["time"] - before["time"], "generation": m["time/generation"], "scoring": m["time/scoring"],
                "training": m["time/training"], "length": m["response/length"],
                "tokens": m["tokens_per_second"] * m["time/generation"]}
               for before, m in itertools.pairwise(lines) if "time/generation" in m]
    summary = json.loads((out / "summary.json").read_text())
    return {"updates": updates, "peak_memory_mb": summary["peak_memory_mb"], "policy": str(out), "summary": summary}


def summarize(result: dict) -> dict:
    """A run's medians over updates 2..N (all of them if there is one)."""
    kept = result["updates"][1:] or result["updates"]
    row = {k: statistics.median(u[k] for u in kept) for k in ("wall", "generation", "scoring", "training", "length")}
    row["other"] = statistics.median(u["wall"] - u["generation"] - u["scoring"] - u["training"] for u in kept)
    if "width" in kept[0]:
        row["width"] = statistics.mean(u["width"] for u in kept)
    row["tokens_per_s"] = sum(u["tokens"] for u in kept) / sum(u["generation"] for u in kept)
    return row | {"peak_memory_mb": result["peak_memory_mb"], **result.get("eval", {})}


def cell(values: list[float], fmt: str = ".2f") -> str:
    """Median, with the range over rounds when there are several."""
    if not values:
        return "-"
    mid = format(statistics.median(values), fmt)
    return mid if len(values) == 1 or min(values) == max(values) else \
        f"{mid} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(results: dict, info: dict) -> str:
    rows = {name: [summarize(r) for r in runs] for name, runs in results.items() if runs}
    trl = statistics.median(r["wall"] for r in rows["trl"]) if "trl" in rows else None
    names = {"trl": f"TRL {info['trl_versions'].get('trl', '?')} PPOTrainer", "ppo": "ppo.py",
             "floor": "compute floor (model passes only)"}
    head = ("| | s/update | ratio to TRL | generation s | scoring s | training s | other s | generated tokens/s | "
            "peak memory MB | final gold | final reward | final KL | response length |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, runs in rows.items():
        col = {k: [r[k] for r in runs if k in r] for k in runs[0]}
        ratio = f"{statistics.median(col['wall']) / trl:.2f}x" if trl else "-"
        lines.append(f"| {names[name]} | {cell(col['wall'])} | {ratio} | {cell(col['generation'])} | "
                     f"{cell(col['scoring'])} | {cell(col['training'])} | {cell(col['other'])} | "
                     f"{cell(col['tokens_per_s'], '.0f')} | "
                     f"{cell(col['peak_memory_mb'], '.0f')} | {cell(col.get('gold', []))} | "
                     f"{cell(col.get('reward', []))} | {cell(col.get('kl', []))} | {cell(col['length'], '.1f')} |")
    return "\n".join(lines)


def report(results: dict, info: dict, args) -> str:
    v = info["trl_versions"]
    precision = "fp32" if args.device == "cpu" else "bf16 autocast with fp32 weights (both)"
    widths = [u["width"] for r in results["trl"] for u in r["updates"][1:] or r["updates"]]
    widths = f"{statistics.mean(widths):.1f}" if widths else "?"
    measured = (
        f"Measured {info['date']} at commit {info['commit']} on {info['machine']}; load average at start: "
        f"`{info['load']}`; 1-minute load before each run: {info['loads_before_runs']}. ppo.py: torch "
        f"{info['torch']}, transformers {info['transformers']}; TRL {v['trl']} (its own environment): torch "
        f"{v['torch']}, transformers {v['transformers']}. {args.rounds} round(s) of {args.updates} updates, one "
        "process at a time, alternately. Command:")
    how = (
        "Same SFT and reward model (the value model starts from the reward model), toy prompts and settings: 64 "
        "prompts per update, at most 48 new tokens, 4 PPO epochs x 2 minibatches of 32, learning rate "
        f"{args.learning_rate:g} (linear decay), KL coefficient 0.05, missing-EOS penalty -1, temperature 1, "
        f"{precision}. Seconds per update: the median over updates 2..N of the wall time between updates (logging "
        "included), then the median (and range) over rounds; the phases likewise (other: the rest of the wall "
        "time, e.g. TRL's gc.collect() and ppo.py's logging). Final gold and reward: each final "
        "policy sampled again on 128 held-out prompts by the same code. The floor always generates 48 tokens (EOS "
        "held back), the largest batch the runs can have: a run whose batches end earlier can beat it (TRL's "
        f"batches held {widths} response tokens on average). Left as each implementation has it: TRL clips "
        "no gradients (ppo.py: norm 1) and subtracts the missing-EOS penalty from the score (ppo.py sets the score "
        "to it); TRL shuffles the prompts with its own sampler. Per-run numbers: `results.json` in the work folder; "
        "`benchmark/speed.py --help` says how each column is measured.")
    return "\n".join([f"{SECTION} ({args.device}, {args.config} model)", "", textwrap.fill(measured, 100), "",
                      f"    {info['command']}", "", textwrap.fill(how, 100), "", table(results, info), ""])


def write_section(path: Path, text: str, title: str) -> None:
    """Put the section at the end of the file, in place of an earlier one with the same title."""
    lines = path.read_text().rstrip("\n").split("\n") if path.exists() else []
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + lines[end:]
    path.write_text("\n".join(lines).rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def machine(device: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    text = f"{os.cpu_count()} CPU cores ({cpu})"
    if device == "cuda":
        gpu = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                             capture_output=True, text=True, check=False).stdout.strip()
        text += f", one {gpu}"
    return text


def main() -> None:
    args = parse_args()
    if args.download_wheels:
        download_wheels(args.download_wheels)
        return
    if args.setup_trl:
        setup_trl(args)
    trl_python = args.trl_python or str(Path(args.venv) / "bin" / "python")
    versions = ("import json, torch, transformers; print(json.dumps({'torch': torch.__version__, "
                "'transformers': transformers.__version__, 'trl': __import__('trl').__version__}))")
    probe = subprocess.run([trl_python, "-c", versions], capture_output=True, text=True, check=False) \
        if Path(trl_python).exists() or args.trl_python else None
    if probe is None or probe.returncode:
        sys.exit(f"no TRL at {trl_python}: run with --setup_trl (or pass --trl_python)")
    info = {"trl_versions": json.loads(probe.stdout), "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
            "machine": machine(args.device), "date": time.strftime("%Y-%m-%d"),
            "command": shlex.join(["python", "benchmark/speed.py", *sys.argv[1:]]),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, check=False).stdout.strip() or "?"}
    ours = versions.replace(", 'trl': __import__('trl').__version__", "")
    info |= json.loads(subprocess.run([sys.executable, "-c", ours], capture_output=True, text=True, check=True).stdout)
    if info["trl_versions"]["trl"] != TRL_PINS[0].split("==")[1]:
        print(f"note: TRL {info['trl_versions']['trl']}, not {TRL_PINS[0]}", flush=True)
    print(f"load average at start: {info['load']}", flush=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sft, rm = models(args, work)
    base_cfg = {"sft": sft, "reward_model": rm, "device": args.device, "settings": SETTINGS, "updates": args.updates,
                "learning_rate": args.learning_rate}
    driver(sys.executable, "_prompts", base_cfg, work, work / "prompts.log")  # writes work/prompts.json
    base_cfg["prompts"] = str(work / "prompts.json")
    results, loads = {"trl": [], "ppo": [], "floor": []}, []
    for r in range(1, args.rounds + 1):
        folder, seed = work / f"round{r}", args.seed + r - 1
        folder.mkdir(exist_ok=True)
        for name in ("trl", "ppo", "floor") if r % 2 else ("ppo", "trl", "floor"):
            loads.append(load := wait_for_quiet(args))
            print(f"round {r}: {name} (1-minute load {load:.2f})", flush=True)
            cfg = base_cfg | {"seed": seed, "out": str(folder / name)}
            if name == "trl":
                result = driver(trl_python, "_trl", cfg, folder, folder / "trl.log")
            elif name == "ppo":
                result = ppo_run(args, sft, rm, seed, folder / "ppo")
            else:
                result = driver(sys.executable, "_floor", cfg, folder, folder / "floor.log")
            if name != "floor":
                result["eval"] = driver(sys.executable, "_eval", cfg | {"policy": result["policy"]}, folder,
                                        folder / f"{name}_eval.log")
            result["load"] = load
            results[name].append(result)
            print(f"  {json.dumps({k: round(v, 3) for k, v in summarize(result).items()})}", flush=True)
    info["loads_before_runs"] = [round(x, 2) for x in loads]
    (work / "results.json").write_text(json.dumps({"info": info, "args": vars(args), "results": results}, indent=1))
    text = report(results, info, args)
    print("\n" + text)
    if args.write:
        write_section(Path(args.results_file), text, text.split("\n")[0])
        print(f"written to {args.results_file}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in DRIVERS:
        DRIVERS[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
