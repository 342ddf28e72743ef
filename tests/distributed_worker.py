"""One optimizer step and the batch statistics, on whatever share of a fixed batch this process
holds. tests/test_distributed.py runs it in one process on the whole batch, and under torchrun with
2 processes (gloo) on half of it each; DDP and the global statistics must make the two agree."""

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common
import ppo
import ppo_max
import rcfd
import reward_model
import sft

TOKENIZER = common.toy_tokenizer()
ROWS = common.toy_dataset("sft")["train"].select(range(8)).to_list()  # the whole batch


def tiny(cls):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(TOKENIZER), n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=TOKENIZER.pad_token_id, num_labels=1,
                        bos_token_id=TOKENIZER.bos_token_id, eos_token_id=TOKENIZER.eos_token_id)
    return cls.from_config(config)


def sgd_step(models: list, loss_fn, fsdp: bool = False) -> dict:
    """One SGD step (sensitive to the gradient's scale, unlike Adam's first step) -> new parameters."""
    models = [common.distribute(m, torch.device("cpu"), fsdp) for m in models]
    optimizer = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.5)
    loss_fn(*models).backward()
    optimizer.step()
    if fsdp and common.world_size() > 1:  # the whole weights, gathered
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        states = [get_model_state_dict(m, options=StateDictOptions(full_state_dict=True)) for m in models]
    else:
        states = [common.unwrap(m).state_dict() for m in models]
    return {f"{i}.{k}": v.detach().clone() for i, state in enumerate(states) for k, v in state.items()}


def shard(x):
    """This process's rows of the whole batch, as the scripts take them: rank::world_size."""
    return x[common.rank()::common.world_size()]


def results() -> dict:
    out = {}
    # sft.py: the completion loss, a token mean over the global batch
    ids, mask, labels = sft.collate(sft.tokenize(shard(ROWS), TOKENIZER, 64), TOKENIZER.pad_token_id)
    out["sft"] = sgd_step([tiny(AutoModelForCausalLM)],
                          lambda m: sft.completion_loss(common.forward(m, ids, mask).logits, labels))

    # reward_model.py: the Bradley-Terry loss (with a centering term), a mean over the global batch of pairs
    pairs = shard(common.toy_dataset("preference")["train"].select(range(8)).to_list())
    seqs = [common.encode_prompt(TOKENIZER, p["prompt"]) + common.encode_completion(TOKENIZER, p[side])
            for side in ("chosen", "rejected") for p in pairs]
    pair_ids, pair_mask = common.pad(seqs, TOKENIZER.pad_token_id)

    def bt_loss(model):
        scores = common.last_token_scores(model, pair_ids, pair_mask)
        return reward_model.bradley_terry_loss(scores[:len(pairs)], scores[len(pairs):], center_coef=0.01)

    out["reward_model"] = sgd_step([common.TokenScores(tiny(AutoModelForSequenceClassification))], bt_loss)

    # ppo.py: policy and value losses on a fixed rollout (prompt, response, old log-probs, advantages, returns)
    g = torch.Generator().manual_seed(1)
    queries, query_mask = common.pad([common.encode_prompt(TOKENIZER, r["prompt"]) for r in ROWS],
                                     TOKENIZER.pad_token_id, "left")
    responses, response_mask = common.pad([common.encode_completion(TOKENIZER, r["completion"])[:10] for r in ROWS],
                                          TOKENIZER.pad_token_id)
    old_logprobs, advantages, returns, old_values = (torch.randn(responses.shape, generator=g) for _ in range(4))
    ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
    ids, mask, response_mask, old_logprobs, advantages, returns, old_values = map(
        shard, (ids, mask, response_mask.float(), old_logprobs, advantages, returns, old_values))
    q = queries.shape[1]

    def ppo_loss(policy, value_model):
        logprobs = common.response_logprobs(policy, ids, mask, q)
        pg_loss, _ = ppo.ppo_policy_loss(logprobs, old_logprobs, advantages, response_mask, 0.2)
        vf_loss, _ = ppo.ppo_value_loss(value_model(ids, mask)[:, q - 1:-1], old_values, returns, response_mask, 0.2)
        return pg_loss + 0.1 * vf_loss

    out["ppo"] = sgd_step([tiny(AutoModelForCausalLM), common.TokenScores(tiny(AutoModelForSequenceClassification))],
                          ppo_loss)

    def ppo_loss_in_micro_batches(policy, value_model):
        """The same loss in micro-batches of 3 rows (3 + 1 on each of 2 ranks, 3 + 3 + 2 in one process), each a
        share of the whole batch's token mean; every micro-batch but the last backward here, without DDP's sync."""
        count, firsts = response_mask.sum(), range(0, len(ids), 3)
        for first in firsts:
            rows = slice(first, first + 3)
            with common.grad_sync(policy, value_model, sync=first == firsts[-1]):
                logprobs = common.response_logprobs(policy, ids[rows], mask[rows], q)
                pg_loss, _ = ppo.ppo_policy_loss(logprobs, old_logprobs[rows], advantages[rows], response_mask[rows],
                                                 0.2, count)
                vf_loss, _ = ppo.ppo_value_loss(value_model(ids[rows], mask[rows])[:, q - 1:-1], old_values[rows],
                                                returns[rows], response_mask[rows], 0.2, count)
                loss = pg_loss + 0.1 * vf_loss
                if first != firsts[-1]:
                    loss.backward()
        return loss

    out["ppo_micro"] = sgd_step([tiny(AutoModelForCausalLM),
                                 common.TokenScores(tiny(AutoModelForSequenceClassification))],
                                ppo_loss_in_micro_batches)
    # FSDP2: the same step with both models sharded (each decoder layer, then the root) takes DDP's step
    out["ppo_fsdp"] = sgd_step([tiny(AutoModelForCausalLM),
                                common.TokenScores(tiny(AutoModelForSequenceClassification))], ppo_loss, fsdp=True)
    # global statistics: whitening, the masked mean, gathering
    out["whiten"] = common.gather(ppo.masked_whiten(advantages, response_mask))
    out["whiten_rewards"] = common.gather(ppo.masked_whiten(returns, response_mask, shift_mean=False))
    out["masked_mean"] = common.all_mean(common.masked_mean(old_logprobs, response_mask))
    # ppo_max.py's running score moments, fed every process's scores; rcfd.py's batch whitening (its baseline);
    # reward_model.py's accuracy on the gathered margins
    moments = ppo_max.RunningMoments()
    for batch in torch.randn(3, 8, generator=g):
        moments.update(common.gather(shard(batch)))
    out["moments"] = torch.tensor([moments.mean, moments.std, moments.count], dtype=torch.float64)
    rewards = torch.randn(8, 2, generator=g)
    out["rcfd_whiten"] = common.gather(rcfd.whiten(shard(rewards)))
    margins = torch.randn(8, generator=g)
    out["accuracy"] = torch.tensor(reward_model.pairwise_accuracy(common.gather(shard(margins))))
    return out


if __name__ == "__main__":  # under torchrun
    dist.init_process_group("gloo")
    computed = results()
    if common.rank() == 0:
        torch.save(computed, sys.argv[1])
    dist.barrier()  # no rank leaves while another still works
    gc.collect()  # the DDP wrappers' threads end before the process group does
    dist.destroy_process_group()
