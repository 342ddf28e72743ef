"""Several processes (torchrun, gloo on the CPU): 2 ranks with half a batch each must take the same
optimizer step and compute the same batch statistics as 1 process on the whole batch."""

import json
import os
import subprocess
import sys

import distributed_worker
import torch
from conftest import ROOT


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_ranks_with_half_a_batch_equal_one_process_with_all_of_it(tmp_path):
    torchrun(str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path / "two.pt"))
    two, one = torch.load(tmp_path / "two.pt"), distributed_worker.results()
    for stage in ("sft", "reward_model", "ppo", "ppo_micro"):
        assert one[stage].keys() == two[stage].keys()
        for name in one[stage]:
            torch.testing.assert_close(two[stage][name], one[stage][name], rtol=0, atol=1e-5, msg=f"{stage} {name}")
    # micro-batches whose gradients add up (DDP syncing on the last only) take the whole batch's step; so does FSDP
    for name in one["ppo"]:
        torch.testing.assert_close(one["ppo_micro"][name], one["ppo"][name], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(two["ppo_fsdp"][name], one["ppo"][name], rtol=0, atol=1e-5, msg=f"fsdp {name}")
    # statistics: ranks hold rows 0,2,4,6 and 1,3,5,7; gathered, they come in rank order
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for key in ("whiten", "whiten_rewards"):
        torch.testing.assert_close(two[key], one[key][order], rtol=0, atol=1e-5)
    torch.testing.assert_close(two["masked_mean"], one["masked_mean"], rtol=0, atol=1e-6)
    torch.testing.assert_close(two["rcfd_whiten"], one["rcfd_whiten"][order], rtol=0, atol=1e-5)
    for key in ("moments", "accuracy"):  # the gathered batch is a permutation: same mean, std, count, accuracy
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-9)


def test_ppo_under_torchrun_reaches_the_length_target_and_writes_one_folder(sft_model, tmp_path):
    out = tmp_path / "ppo"
    torchrun(str(ROOT / "ppo.py"), "--sft_model_path", str(sft_model), "--reward", "length", "--target_length", "6",
             "--total_episodes", "384", "--batch_size", "32", "--eval_rows", "64", "--max_new_tokens", "32",
             "--learning_rate", "5e-4", "--output_dir", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and json.loads((out / "args.json").read_text())["world_size"] == 2
    assert summary["length_error"] < 0.6 * summary["initial"]["length_error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ppo"]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 64  # every held-out prompt, once
