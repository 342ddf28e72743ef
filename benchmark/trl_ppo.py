"""TRL's PPOTrainer at ppo.py's settings, for benchmark/speed.py, run by the python of TRL's
environment (benchmark/RESULTS.md's speed section makes one): `trl_ppo.py _trl config.json`, its result to the
config's "result" path. Each update is timed between on_step_end calls; generation by wrapping batch_generation;
training from the first forward with gradients; scoring (reference, value, reward passes, GAE) in between.
"""

import importlib.metadata
import json
import os
import resource
import sys
import time
from pathlib import Path


def trl_driver(cfg: dict) -> None:
    os.environ |= {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "true", "TRL_EXPERIMENTAL_SILENCE": "1"}
    import datasets
    import torch
    import transformers
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    transformers.utils.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg["sft"])
    tokenizer.padding_side = "left"
    fp32 = {"dtype": torch.float32}  # as ppo.py holds them on a CPU, whatever dtype a checkpoint was stored in
    policy, ref_policy = (transformers.AutoModelForCausalLM.from_pretrained(cfg["sft"], **fp32) for _ in range(2))
    value_model, reward_model = (transformers.AutoModelForSequenceClassification.from_pretrained(
        cfg["reward_model"], num_labels=1, **fp32) for _ in range(2))
    prompts = json.loads(Path(cfg["prompts"]).read_text())
    train, test = (datasets.Dataset.from_list([{"input_ids": ids} for ids in prompts[k]]) for k in ("train", "test"))
    s = cfg["settings"]
    args = PPOConfig(
        output_dir=cfg["out"], seed=cfg["seed"], learning_rate=cfg["learning_rate"], adam_epsilon=1e-5,
        per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=s["num_mini_batches"], num_ppo_epochs=s["num_ppo_epochs"],
        total_episodes=cfg["updates"] * s["batch_size"], local_rollout_forward_batch_size=s["batch_size"],
        response_length=s["max_new_tokens"], temperature=s["temperature"], kl_coef=s["kl_coef"],
        missing_eos_penalty=-s["missing_eos_score"],  # TRL subtracts its penalty from the score; ppo.py sets the score
        stop_token="eos", num_sample_generations=0, per_device_eval_batch_size=s["batch_size"],
        bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, sft_model_path=cfg["sft"], reward_model_path=cfg["reward_model"])

    updates, now = [], {}
    generation, forward = module.batch_generation, module.forward

    def timed_generation(model, queries, *rest, **kwargs):
        now["generation_start"] = time.perf_counter()
        query_responses, logits = generation(model, queries, *rest, **kwargs)
        now["generation_end"] = time.perf_counter()
        responses = query_responses[:, queries.shape[1]:]  # tokens up to and including the first EOS; the length
        is_eos = responses == tokenizer.eos_token_id  # without it, as ppo.py counts them
        ended, now["width"] = is_eos.any(-1), responses.shape[1]
        first = torch.where(ended, is_eos.float().argmax(-1), now["width"])
        now["tokens"], now["length"] = int((first + ended.long()).sum()), float(first.float().mean())
        return query_responses, logits

    def timed_forward(model, query_responses, pad_token_id):
        if torch.is_grad_enabled() and "training_start" not in now:
            now["training_start"] = time.perf_counter()
        return forward(model, query_responses, pad_token_id)

    module.batch_generation, module.forward = timed_generation, timed_forward

    class Timer(transformers.TrainerCallback):
        def on_train_begin(self, *_, **__):
            now["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            end = time.perf_counter()
            updates.append({"wall": end - now["start"], "tokens": now["tokens"], "length": now["length"],
                            "width": now["width"], "generation": now["generation_end"] - now["generation_start"],
                            "scoring": now["training_start"] - now["generation_end"],
                            "training": end - now["training_start"]})
            now.clear()
            now["start"] = end

    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=train, eval_dataset=test,
                         callbacks=[Timer()])
    trainer.train()
    peak, out = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, Path(cfg["out"]) / "policy"
    trainer.policy_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "trl")}
    result = {"updates": updates, "peak_memory_mb": peak, "policy": str(out), "versions": versions}
    Path(cfg["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    trl_driver(json.loads(Path(sys.argv[2]).read_text()))
