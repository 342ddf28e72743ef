"""Peak memory of PPO iterations at a real vocabulary: does it grow with the batch or with --micro_batch_size?

A tiny Llama whose vocabulary is the toy tokenizer's padded to SmolLM2's 49,152 tokens, stored in bf16, random weights
(so every response runs to the length limit), is SFT policy, reference, reward and value model; ppo.py runs at each
--batch_size (with --trl_python, TRL's PPOTrainer too, through benchmark/trl_ppo.py). benchmark/RESULTS.md,
"Memory at a real vocabulary", has the commands and the tables.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from speed import ROOT, ppo_result  # benchmark/speed.py (which puts the repository's root on sys.path)

NEW_TOKENS = 128
PHASES = ("generation", "scoring", "training")
# ppo.py's defaults, for TRL's driver
SETTINGS = {"num_mini_batches": 2, "num_ppo_epochs": 4, "max_new_tokens": NEW_TOKENS, "kl_coef": 0.05,
            "missing_eos_penalty": -1.0, "temperature": 1.0, "eval_rows": 16}
TINY = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": False,
        "vocab_size": 49152}  # SmolLM2's vocabulary


def build_base(out: Path, **arch) -> None:
    """A Llama of the given config fields, random weights, saved in bf16 as hub checkpoints are, over the toy tokenizer
    padded with unused tokens to its vocab_size, so that the output layer costs what it does at a real vocabulary
    (benchmark/gpu_smoke.sh builds its SmolLM-shaped model with it)."""
    import tokenizers
    import torch
    import transformers

    import common

    toy = common.toy_tokenizer()
    words = [toy.convert_ids_to_tokens(i) for i in range(len(toy))]
    vocab = {w: i for i, w in enumerate(words + [f"<unused_{i}>" for i in range(arch["vocab_size"] - len(words))])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=common.UNK))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{common.BOS} $A", special_tokens=[(common.BOS, toy.bos_token_id)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=common.PAD,
                                                     bos_token=common.BOS, eos_token=common.EOS, unk_token=common.UNK,
                                                     padding_side="left")
    config = transformers.LlamaConfig(**arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = sum(p.numel() for p in model.parameters())
    print(f"base model: {size / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}")


def ppo_run(args, base: Path, batch_size: int) -> dict:
    out = args.work_dir / f"{args.source.resolve().name}-b{batch_size}-m{args.micro_batch_size}"
    micro = ["--micro_batch_size", str(args.micro_batch_size)] if args.micro_batch_size else []
    cmd = [sys.executable, "ppo.py", "--sft_model_path", str(base), "--reward_model_path", str(base),
           "--output_dir", str(out), "--overwrite", "--batch_size", str(batch_size), "--total_episodes",
           str(args.updates * batch_size), "--max_new_tokens", str(NEW_TOKENS), "--eval_rows", "16",
           "--eval_every", "1000000", "--save_every", "1000000", *micro]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=args.source, check=True, stdout=subprocess.DEVNULL)
    return ppo_result(out)


def trl_run(args, base: Path, batch_size: int) -> dict:
    """TRL's PPOTrainer at ppo.py's settings, rollout and training passes of --micro_batch_size rows."""
    work = args.work_dir / f"trl-b{batch_size}-m{args.micro_batch_size}"
    work.mkdir(parents=True, exist_ok=True)
    settings = SETTINGS | {"batch_size": batch_size, "micro_batch_size": args.micro_batch_size}
    cfg = {"sft": str(base), "reward_model": str(base), "settings": settings, "seed": 1, "updates": args.updates,
           "learning_rate": 3e-4, "out": str(work / "out")}
    for name, python, script in (("_prompts", sys.executable, "speed.py"), ("_trl", args.trl_python, "trl_ppo.py")):
        cfg["result"] = str(work / f"{name}.json")
        (work / f"{name}.config.json").write_text(json.dumps(cfg))
        print(f"$ {python} benchmark/{script} {name} {work / f'{name}.config.json'}", flush=True)
        subprocess.run([python, str(ROOT / "benchmark" / script), name, str(work / f"{name}.config.json")],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cfg["prompts"] = str(work / "_prompts.json")
    return json.loads((work / "_trl.json").read_text())


def row(name: str, batch_size: int, micro: int, result: dict) -> str:
    kept = result["updates"][1:] or result["updates"]  # update 1 pays for warm-up
    cells = [statistics.median(u[k] for u in kept) for k in ("wall", *PHASES)]
    return (f"| {name} | {batch_size} | {micro or 'whole minibatch'} | {result['peak_memory_mb'] / 1024:.2f} | "
            + " | ".join(f"{c:.1f}" for c in cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--micro_batch_size", type=int, default=8, help="0: leave the flag out (the whole minibatch)")
    p.add_argument("--updates", type=int, default=1, help="PPO iterations per run (s/update: median of 2..N)")
    p.add_argument("--source", type=Path, default=ROOT, help="the checkout whose ppo.py runs (default: this one)")
    p.add_argument("--trl_python", help="also run TRL's PPOTrainer with this python")
    p.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "bench" / "memory")
    args = p.parse_args()
    base = args.work_dir / "base"
    if not (base / "config.json").exists():
        build_base(base, **TINY)
    rows = []
    for batch_size in args.batch_sizes:
        rows.append(row("ppo.py", batch_size, args.micro_batch_size, ppo_run(args, base, batch_size)))
        if args.trl_python:
            rows.append(row("TRL PPOTrainer", batch_size, args.micro_batch_size, trl_run(args, base, batch_size)))
    print("\n| | --batch_size | --micro_batch_size | peak memory GB | s/update | generation s | scoring s | "
          "training s |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
