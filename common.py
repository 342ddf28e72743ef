"""The module minrlhf's scripts share, read top-down as a copier needs it: 1. the training loop's primitives (forward
passes, log-probs, generation, scores, reductions over processes); 2. starting a run and its folder (checks, processes,
checkpoints, the final model); 3. loading models, tokenizers and data in TRL's formats; 4. the toy world, which a
copier deletes. A function that all ranks must call together under torchrun says "Collective" first."""

import functools
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import ExitStack, nullcontext, suppress
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import datasets
import numpy as np
import tokenizers
import torch
import torch.distributed as dist
import transformers
from tqdm import tqdm

if not sys.stderr.isatty():  # no progress bars in logs, so that one-line errors stay one line
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


# ======================================================================================================================
# 1. The training loop's primitives, in the order ppo.py's loop calls them: padding, forward passes and
#    log-probs, generation, scores; then the reductions over the batch and over processes (the collectives).
# ======================================================================================================================

def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into (batch, max_len) ids and attention mask; "left" for generation."""
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], True, pad_id, side)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs], True, 0, side)
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, which GPT-2's plain forward pass (transformers 5) does not derive."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def forward(model, ids: torch.Tensor, mask: torch.Tensor):
    """Model forward with mask-derived position ids and no KV cache (a training or scoring pass has no next token)."""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(label) under softmax(logits / temperature), (B, T, V) and (B, T) -> (B, T): the label's logit minus the
    logsumexp, never a second (B, T, V) tensor; the fp32 copy lives for this call only (pass a micro-batch)."""
    logits = logits.float() / temperature
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def response_logprobs(model, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (B, R) of the response part of query_response, mask (B, context_len + R). The logit at position t
    predicts token t+1, hence the shift by one; no (B, R, V) logits outlive this call."""
    logits = forward(model, query_response, mask).logits[:, context_len - 1:-1]
    return logprobs_from_logits(logits, query_response[:, context_len:], temperature)


def in_chunks(fn, size: int, *rows) -> torch.Tensor:
    """fn(*chunk) over consecutive chunks of `size` rows of each of `rows` (tensors or lists of equal length),
    concatenated along dim 0: a no-grad pass whose memory is bounded by the chunk, not the batch."""
    return torch.cat([fn(*(r[i:i + size] for r in rows)) for i in range(0, len(rows[0]), size)])


def truncate_after_eos(responses: torch.Tensor, eos_ids: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, R) of the tokens up to and including the first stop token (any of eos_ids); (B,) whether one came."""
    is_eos = torch.isin(responses, torch.as_tensor(eos_ids, device=responses.device)).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long(), is_eos.bool().any(-1)


class _SampledLogprobs(transformers.LogitsProcessor):
    """Reads log pi(a_t) of each generated token as generation goes, keeping no (B, R, V) logits. A processor passed
    to generate() runs before its temperature, so each call gets step t's raw logits and the tokens up to t - 1: it
    keeps the step's fp32 logits / T and reads the drawn token's log-prob at the next call. Sampling is untouched."""

    def __init__(self, temperature: float):
        self.temperature, self.logits, self.logprobs = temperature, None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.read(input_ids[:, -1])
        self.logits = scores.float() / self.temperature  # (B, V), this step's only
        return scores

    def read(self, tokens: torch.Tensor) -> None:
        if self.logits is not None:
            self.logprobs.append(logprobs_from_logits(self.logits[:, None], tokens[:, None])[:, 0])
            self.logits = None


@torch.no_grad()
def generate(model, queries: torch.Tensor, query_mask: torch.Tensor, tokenizer, max_new_tokens: int,
             temperature: float = 1.0, greedy: bool = False):
    """Sample responses for left-padded queries (B, Q) with the KV cache, each ending at its first stop token (EOS or
    the chat template's end of turn: stop_ids). -> responses (B, R <= max_new_tokens) padded after it, response_mask
    (B, R) up to and including it, ended (B,) (a stop token came), and the sampled tokens' log-probs (B, R) under
    softmax(logits / temperature), read step by step: PPO's old log-probs, without a second pass or (B, R, V) logits."""
    # Only softmax(logits / T): a hub model's own generation config (repetition penalty, suppressed tokens, ...)
    # would sample from another distribution than our log-probs, so generate() sees a config of ours alone.
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    stops = stop_ids(tokenizer)
    config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
        return_dict_in_generate=True, **({"do_sample": False} if greedy else sampling))
    model, reader = unwrap(model), _SampledLogprobs(temperature)
    saved, model.generation_config = model.generation_config, config  # generate() would fill gaps from it
    layers = [m for m in model.modules() if sharded(m)]
    for m in layers:  # FSDP: gather each layer's weights once for the whole generation, not once per token
        m.set_reshard_after_forward(False, recurse=False)
    try:  # synced_gpus (FSDP): a rank whose responses all ended keeps stepping until every rank's have
        out = model.generate(input_ids=queries, attention_mask=query_mask, synced_gpus=bool(layers),
                             logits_processor=transformers.LogitsProcessorList([reader]))
    finally:
        model.generation_config = saved
        for m in layers:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP's default: the root stays gathered
    responses = out.sequences[:, queries.shape[1]:]
    reader.read(responses[:, -1])  # the last step's token
    response_mask, ended = truncate_after_eos(responses, stops)
    responses = responses.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return responses, response_mask, ended, torch.stack(reader.logprobs[:responses.shape[1]], 1)


class TokenScores(torch.nn.Module):
    """A classifier's scalar head (reward or value model) at every position: ids, mask (B, T) -> scores (B, T).
    It skips transformers' pooling, which finds the last token by the pad id and so breaks when pad == EOS or
    with left padding; and it is a module, so that DDP can wrap it."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = forward(self.classifier.base_model, ids, mask).last_hidden_state  # the module-level forward()
        return self.classifier.score(hidden).squeeze(-1).float()


def last_token_scores(model: TokenScores, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Score of each sequence read at its last real token (its stop token), for left or right padding. -> (B,)"""
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # index of the last 1 in each row
    return model(ids, mask)[torch.arange(len(ids)), last]


def retokenize(prompts: list[str], responses: torch.Tensor, response_mask: torch.Tensor, tokenizer,
               other_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response ids for a model with another tokenizer (a reward model, say): through text, right-padded.
    A response that ended gets the other tokenizer's stop token of the same name (a shared chat template's end of
    turn), else its EOS; one cut at the length limit gets none."""
    stops, other_stops = stop_ids(tokenizer), stop_ids(other_tokenizer)
    rows = []
    for prompt, row, mask in zip(prompts, responses.tolist(), response_mask.tolist()):
        tokens = [t for t, m in zip(row, mask) if m]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        end = []
        if tokens and tokens[-1] in stops:
            same = other_tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(tokens[-1]))
            end = [same if same in other_stops else other_tokenizer.eos_token_id]
        rows.append(encode_prompt(other_tokenizer, prompt) +
                    encode_completion(other_tokenizer, text, add_eos=False, prompt=prompt) + end)
    return pad(rows, other_tokenizer.pad_token_id)


def reward_model_scores(reward_model: TokenScores, prompts: list[str], queries: torch.Tensor, query_mask: torch.Tensor,
                        responses: torch.Tensor, response_mask: torch.Tensor, tokenizer, rm_tokenizer,
                        same_vocab: bool, device: torch.device) -> torch.Tensor:
    """A reward model's score of each response (B,), read at its last real token, its EOS (N+): on the policy's ids
    (left-padded queries, right-padded responses), or, for a reward model without the policy's vocabulary, on the
    text retokenized its way (rm_tokenizer)."""
    ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
    if not same_vocab:
        ids, mask = retokenize(prompts, responses, response_mask, tokenizer, rm_tokenizer)
    with autocast(device):
        return last_token_scores(reward_model, ids.to(device), mask.to(device))


def response_length(responses: torch.Tensor, response_mask: torch.Tensor, eos_ids: int | list[int]) -> torch.Tensor:
    """Number of response tokens excluding the stop token (any of eos_ids: stop_ids). (B, R) -> (B,)"""
    stopped = torch.isin(responses, torch.as_tensor(eos_ids, device=responses.device)) & (response_mask == 1)
    return response_mask.sum(-1) - stopped.any(-1).long()


def length_reward(n_tokens: torch.Tensor, target: int) -> torch.Tensor:
    """Golden length reward 1 - |n/N - 1| (Fan et al. 2023; Singhal et al. 2023's LPPO)."""
    return 1.0 - (n_tokens.float() / target - 1.0).abs()


def decode_responses(tokenizer, responses: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Text of each response (B, R) up to its stop token (stop_ids), which is left out. Other special tokens stay
    visible (a `<pad>` sampled mid-response, say), so that the toy gold reward sees them as malformed."""
    stops = torch.as_tensor(stop_ids(tokenizer), device=responses.device)
    keep = (response_mask == 1) & ~torch.isin(responses, stops)
    return [tokenizer.decode(row[k].tolist()) for row, k in zip(responses, keep)]


# Processes (torchrun): each rank holds a shard of the batch, and these combine the shards ----------------------------

def rank() -> int:
    """This process's rank, as torchrun sets it (0: the main process, the only one without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes torchrun started (1 without it); known before setup() joins them into a group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """Collective: the mean of x over ranks (x itself in one process)."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def gather(x: torch.Tensor | list) -> torch.Tensor | list:
    """Collective: a small tensor (concatenated along dim 0) or a list over ranks, in rank order."""
    if world_size() == 1:
        return x
    parts = [None] * world_size()
    dist.all_gather_object(parts, x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    return torch.cat(parts).to(x.device) if isinstance(x, torch.Tensor) else [v for part in parts for v in part]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | int | None = None) -> torch.Tensor:
    """Collective: the mean of x where mask is 1, over all ranks' entries: each rank divides its sum by the mean count
    over ranks, so that the mean over ranks (DDP's of gradients, all_mean's of statistics) is the overall mean. For a
    micro-batch, `count` is this rank's count in its minibatch: the micro-batch values sum to the minibatch's mean."""
    count = mask.sum() if count is None else torch.as_tensor(count, device=mask.device)
    return (x * mask).sum() / all_mean(count.float()).clamp(min=1 / world_size())  # no entries: 0, not NaN


def grad_sync(*models: torch.nn.Module, sync: bool):
    """A context for one micro-batch's forward and backward: under DDP the gradient all-reduce (a collective in
    backward) runs only where `sync`, the minibatch's last micro-batch; before it, gradients accumulate locally."""
    stack = ExitStack()
    for model in models:
        if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            stack.enter_context(model.no_sync())
    return stack


def sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP shards the model: then every forward pass is a collective, which every rank must make as often."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU (where bf16 is slower for small models)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(policy, ref_policy, tokenizer, prompts: list[str], queries: list[list[int]], score_fn,
             max_new_tokens: int, temperature: float = 1.0, greedy: bool = False, batch_size: int = 64,
             seed: int = 0, micro_batch_size: int | None = None) -> tuple[dict, list[dict]]:
    """Collective: mean score_fn(prompts, queries, query_mask, responses, response_mask) -> (B,) on held-out prompts,
    KL to the reference (sum of log pi - log pi_ref on the policy's samples), length and EOS rate; one sample per
    prompt. Each rank samples every world_size-th batch of `batch_size` prompts; reference and score passes run in
    chunks of micro_batch_size rows. Sampling has its own seed and leaves the training RNG as it was; the policy is
    left in eval() mode."""
    device = next(policy.parameters()).device
    unwrap(policy).eval()
    samples, starts = [], list(range(rank() * batch_size, len(prompts), world_size() * batch_size))
    if sharded(policy):  # every rank generates as often as the others, each time as many rows (padded, below)
        starts += [len(prompts)] * (math.ceil(len(prompts) / batch_size / world_size()) - len(starts))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + rank())
        for i in starts:
            batch_prompts, batch_queries = prompts[i:i + batch_size], queries[i:i + batch_size]
            real = len(batch_queries)  # the rest: copies of the first prompt, whose samples are dropped
            batch_queries += [queries[0]] * (min(batch_size, len(prompts)) - real if sharded(policy) else 0)
            query_ids, query_mask = (t.to(device) for t in pad(batch_queries, tokenizer.pad_token_id, "left"))
            with autocast(device):
                responses, response_mask, ended, logprobs = generate(policy, query_ids, query_mask, tokenizer,
                                                                     max_new_tokens, temperature, greedy)
                ids, mask = torch.cat([query_ids, responses], 1), torch.cat([query_mask, response_mask], 1)
                chunk = micro_batch_size or len(ids)
                ref_logprobs = in_chunks(functools.partial(response_logprobs, ref_policy, temperature=temperature,
                                                           context_len=query_ids.shape[1]), chunk, ids, mask)
                if real:  # a reward, never the policy: no padding needed
                    scores = in_chunks(score_fn, chunk, batch_prompts, query_ids[:real], query_mask[:real],
                                       responses[:real], response_mask[:real])
            kl = ((logprobs - ref_logprobs) * response_mask).sum(-1)
            lengths = response_length(responses, response_mask, stop_ids(tokenizer))
            texts = decode_responses(tokenizer, responses, response_mask)
            for j, (prompt, text) in enumerate(zip(batch_prompts, texts)):
                samples.append({"index": i + j, "prompt": prompt, "response": text, "score": scores[j].item(),
                                "kl": kl[j].item(), "length": lengths[j].item(), "eos": bool(ended[j])})
    samples = sorted(gather(samples), key=lambda s: s["index"])
    keys = {"reward": "score", "kl": "kl", "length": "length", "eos_rate": "eos"}
    return {name: sum(float(s[k]) for s in samples) / len(samples) for name, k in keys.items()}, samples


# ======================================================================================================================
# 2. Starting a run: argument checks, processes and sharding, and the run folder (metrics, checkpoints, the model)
# ======================================================================================================================

def fail(message: str) -> NoReturn:
    """Exit with a one-line error (status 2, no traceback): for bad input the user can fix."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args, positive: tuple[str, ...] = (), nonnegative: tuple[str, ...] = ()) -> None:
    """fail() unless each named flag is in its range (None means "off" and passes)."""
    for name in positive + nonnegative:
        value = getattr(args, name)
        if value is not None and not (value > 0 if name in positive else value >= 0):  # NaN fails too
            fail(f"--{name} must be {'positive' if name in positive else 'at least 0'}, got {value}")
    if args.resume and args.overwrite:
        fail("--resume continues a run and --overwrite replaces it: pass one of them")


RUN_FILES = ("args.json", "metrics.jsonl", "checkpoint.pt", "summary.json")
SEED_STRIDE = 100003  # N+ detail: rank r seeds its RNGs with seed + r * SEED_STRIDE
_interrupt_note = ""  # what Ctrl-C prints: where the last checkpoint is and how to resume (set by setup, Run.save)
_resume_command = ""
_peak_cuda = 0  # the highest peak GPU memory seen before a phase_peak reset


def setup(args) -> tuple[torch.device, int, int]:
    """Start a run before anything loads: check --output_dir and --device, join torchrun's process group (NCCL, a GPU
    per rank, on CUDA; gloo on CPU), seed each rank apart, install the Ctrl-C handler. -> device, rank, world_size"""
    out = Path(args.output_dir)
    if getattr(args, "fsdp", False) and world_size() < 2:
        fail("--fsdp shards the models across processes: launch with torchrun --nproc_per_node N (N >= 2), or drop it")
    holds_run = any((out / f).exists() for f in RUN_FILES)
    if args.resume and not (out / "checkpoint.pt").exists():
        fail(f"--resume: {out} holds a finished run" if (out / "summary.json").exists() else
             f"--resume: {out} holds no checkpoint; start anew with --overwrite")
    if args.resume and (out / "args.json").exists():  # a run folder holds one run: the same flags throughout
        saved = json.loads((out / "args.json").read_text())
        free = ("resume", "overwrite", "output_dir", "save_every", "track", "device", "world_size")
        now = json.loads(json.dumps(asdict(args)))  # as args.json holds them (tuples as lists)
        if changed := [k for k, v in now.items() if k not in free and k in saved and saved[k] != v]:
            fail(f"--resume continues a run with its own flags, but --{changed[0]} differs: {saved[changed[0]]!r} "
                 f"in {out / 'args.json'}")
    if holds_run and not (args.resume or args.overwrite):
        fail(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
    if out.is_dir() and not holds_run and any(not p.name.startswith(".") for p in out.iterdir()):
        fail(f"{out} holds files that are not a run: choose another --output_dir")
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:  # try a write (os.access trusts root), and leave no trace until the run first writes
        out.mkdir(parents=True, exist_ok=True)
        (out / f".write-test-{os.getpid()}").touch()
        (out / f".write-test-{os.getpid()}").unlink()
    except OSError as e:
        fail(f"cannot write to --output_dir {out}: {e.strerror}")
    finally:
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    if device not in ("cpu", "cuda"):
        fail(f"--device {args.device}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but torch finds no CUDA device: use --device cpu")
    if world_size() > 1:
        if device == "cuda":
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")
    transformers.set_seed(args.seed + rank() * SEED_STRIDE)
    global _interrupt_note, _resume_command
    again = " ".join(a for a in sys.argv if a != "--overwrite")  # the command that started this run
    _resume_command = f"python {again}" + ("" if args.resume else " --resume")
    _interrupt_note = (f"resume with: {_resume_command}" if args.resume else
                       "no checkpoint was written yet: rerun with --overwrite")
    signal.signal(signal.SIGINT, _interrupted)
    return torch.device(device), rank(), world_size()


def _interrupted(*_) -> NoReturn:
    if rank() == 0:
        print(f"\ninterrupted: {_interrupt_note}", file=sys.stderr)
    sys.exit(130)


def distribute(model: torch.nn.Module, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """A trained model under torchrun: replicated (DDP: a full copy per process, gradients all-reduced) or, with
    `fsdp`, sharded (FSDP2: each decoder layer, then the root; a process holds 1/N of the weights, gradients and
    optimizer state, and gathers a layer's weights only while it runs). fp32 master weights either way; FSDP on CUDA
    computes in bf16 and reduces gradients in fp32. Build the optimizer afterwards: FSDP replaces the parameters."""
    if world_size() == 1:
        return model
    if not fsdp:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
                 else MixedPrecisionPolicy())
    for layer in decoder_layers(model):  # a TokenScores: its classifier's layers, then itself as the root
        fully_shard(layer, mp_policy=precision)
    fully_shard(model, mp_policy=precision)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a transformers model (or of a TokenScores' classifier), which transformers names in
    _no_split_modules: what FSDP shards one by one. fail() where there are none to find."""
    inner = getattr(model, "classifier", model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in inner.modules() if type(m).__name__ in names]
    if not layers:
        fail(f"--fsdp: cannot find the decoder layers of {type(inner).__name__} (its _no_split_modules names none of "
             "its modules): train it without --fsdp")
    return layers


def gathered(model: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module:
    """Collective: `plain`, an unsharded copy of a sharded model's architecture, loaded with the sharded model's
    weights on every process, for work after training that needs the whole model in one place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    plain.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
    return plain


# The run folder: metrics, checkpoints, the final model ----------------------------------------------------------------

def progress(iterable=None, **kwargs):
    """A progress bar on stderr of rank 0, when stderr is a terminal (tqdm's disable=None)."""
    return tqdm(iterable, disable=None if rank() == 0 else True, dynamic_ncols=True, **kwargs)


def write_json(path: str | Path, obj) -> None:
    """Write JSON (a dict, or a list as JSON lines) atomically: to a temporary name, then renamed."""
    text = "".join(json.dumps(o) + "\n" for o in obj) if isinstance(obj, list) else json.dumps(obj, indent=2) + "\n"
    Path(f"{path}.tmp").write_text(text)
    os.replace(f"{path}.tmp", path)


def phase_peak(device: torch.device, phase: str) -> dict:
    """{"memory/<phase>_gb": the peak GPU memory allocated since the last call}, and a reset, on CUDA; {} on a CPU,
    where the peak resident memory cannot be reset."""
    global _peak_cuda
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device)
    _peak_cuda = max(_peak_cuda, peak)
    torch.cuda.reset_peak_memory_stats(device)
    return {f"memory/{phase}_gb": round(peak / 2**30, 3)}


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident memory (Linux: KiB)."""
    if torch.cuda.is_available():
        return max(_peak_cuda, torch.cuda.max_memory_allocated()) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Run:
    """A run folder, written by rank 0: a stdout line per logged step, metrics.jsonl, TensorBoard (if installed), W&B
    (--track); args.json (flags, world_size, `derived` sizes); checkpoints; the final model, samples and summary.
    Every rank builds it. `state` names what a checkpoint holds besides the RNGs and the loop's values (`resumed` after
    --resume): anything with state_dict and load_state_dict (models, optimizer, scheduler), which --resume loads."""

    def __init__(self, args, state: dict, derived: dict | None = None):
        self.state, self.dir = state, Path(args.output_dir)
        self.checkpoint, self.start = self.dir / "checkpoint.pt", time.time()
        self.resumed, offset = None, 0
        # FSDP: sharded models and their optimizer go through torch.distributed.checkpoint, each rank its own shard
        self.shard_models = torch.nn.ModuleDict({name: obj for name, obj in state.items() if sharded(obj)})
        optimizers = [obj for obj in state.values() if isinstance(obj, torch.optim.Optimizer)]
        self.shard_optimizers = optimizers if len(self.shard_models) else []
        self.sharded = {*self.shard_models, *(n for n, obj in state.items() if obj in self.shard_optimizers)}
        if args.resume:
            saved = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
            for name, obj in state.items():
                if name not in self.sharded:
                    unwrap(obj).load_state_dict(saved[name])
            if self.sharded:
                self._load_shards(self.dir / saved["shards"])
            if len(saved["rng"]) != world_size():
                fail(f"the checkpoint in {self.dir} was written by {len(saved['rng'])} processes: resume with as many")
            mine = saved["rng"][rank()]
            random.setstate(mine["python"])
            np.random.set_state(mine["numpy"])
            torch.set_rng_state(mine["torch"])
            if mine["cuda"] is not None:
                torch.cuda.set_rng_state_all(mine["cuda"])
            self.resumed, offset = saved["loop"], saved["metrics_offset"]
        self.tb = self.wandb = None
        if rank() != 0:
            return
        if not args.resume:  # --overwrite: setup() let only an empty folder or a whole run through
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.dir / ".saving", ignore_errors=True)  # leftovers of a save cut short
        self._remove_shards(keep=saved.get("shards") if args.resume else None)
        self.metrics = open(self.dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the whole run)
        self.metrics.truncate(offset)  # lines logged after the checkpoint are dropped
        self.metrics.seek(offset)
        write_json(self.dir / "args.json", asdict(args) | {"world_size": world_size(), "derived": derived or {}})
        with suppress(ImportError):  # TensorBoard is optional
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=self.resumed["step"] + 1 if args.resume else None)
        if args.track:
            import wandb
            self.wandb = wandb.init(project="minrlhf", config=asdict(args), name=self.dir.name)

    def log(self, metrics: dict, step: int) -> None:
        """Collective: average each metric over ranks; rank 0 prints one line and appends it to metrics.jsonl."""
        keys = [k for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))]
        means = all_mean(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
        metrics = {"step": step, "time": round(time.time() - self.start, 2)} | metrics | {
            k: round(v) if isinstance(metrics[k], int) else v for k, v in zip(keys, means.tolist())}
        if rank() != 0:
            return
        self.metrics.write(json.dumps(metrics) + "\n")
        self.metrics.flush()
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                       if not isinstance(v, dict)), flush=True)
        for k, v in metrics.items():
            if self.tb and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.wandb:  # W&B counts its own steps (ppo_max.py's critic warm-up logs steps below 0)
            self.wandb.log(metrics)

    def _shard_state(self) -> dict:
        """The sharded models' and optimizer's state, as torch.distributed.checkpoint saves and loads it."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optimizer_state = get_state_dict(self.shard_models, self.shard_optimizers)
        return {"models": model_state, "optimizer": optimizer_state}

    def _load_shards(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = self._shard_state()  # which gives every parameter optimizer state, real or zero
        dcp.load(state, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))  # in place
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        for fqn in list(state["optimizer"]["state"]):  # a parameter not updated yet (ppo_max's warm-up policy): none
            if not any(s.startswith(f"optimizer.state.{fqn}.") for s in saved):
                del state["optimizer"]["state"][fqn]
        set_state_dict(self.shard_models, self.shard_optimizers, model_state_dict=state["models"],
                       optim_state_dict=state["optimizer"])

    def _remove_shards(self, keep: str | None) -> None:
        """Delete every shards-* folder but `keep`: older checkpoints', and any a kill cut short (rank 0)."""
        for folder in self.dir.glob("shards-*"):
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)

    def check_finite(self, step: int, **values: torch.Tensor) -> None:
        """Collective: the divergence guard. At the first non-finite loss or gradient norm, a one-line error and exit
        status 1 on every rank, before the bad update reaches a checkpoint or the saved model."""
        from torch.distributed.tensor import DTensor
        finite = torch.stack([torch.isfinite(v.to_local() if isinstance(v, DTensor) else v).all().cpu()
                              for v in values.values()]).float()
        if world_size() > 1:  # every rank's verdict, in one collective, so that all of them stop together
            dist.all_reduce(finite, dist.ReduceOp.MIN)
        for (name, value), ok in zip(values.items(), finite.tolist()):
            if not ok:
                kept = (f"the last good checkpoint is {self.checkpoint}" if self.checkpoint.exists()
                        else "no checkpoint was written")
                value = value.full_tensor() if isinstance(value, DTensor) else value
                print(f"error: step {step}: {name} is {value.float().max().item()}: training diverged "
                      f"(is --learning_rate too high?); {kept}", file=sys.stderr)
                sys.exit(1)

    def save(self, step: int, **loop) -> None:
        """Collective: checkpoint the `state` objects, every rank's RNGs, the loop's values (rank 0's: they must agree
        across ranks) and where metrics.jsonl ends; atomically (a temporary file renamed): a kill leaves a whole one."""
        rngs = gather([{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}])
        shards = {}
        if self.sharded:  # every rank writes its shards into a new folder, which checkpoint.pt then names
            import torch.distributed.checkpoint as dcp
            shards = {"shards": f"shards-{step}"}
            dcp.save(self._shard_state(), checkpoint_id=self.dir / shards["shards"])  # done on every rank on return
        if rank() == 0:
            tmp = self.dir / "checkpoint.pt.tmp"
            states = {name: unwrap(obj).state_dict() for name, obj in self.state.items() if name not in self.sharded}
            torch.save(states | {"rng": rngs, "loop": loop | {"step": step}, "metrics_offset": self.metrics.tell()}
                       | shards, tmp)
            os.replace(tmp, self.checkpoint)
            self._remove_shards(keep=shards.get("shards"))  # the earlier checkpoint's
        global _interrupt_note
        _interrupt_note = f"the last checkpoint (step {step}) is {self.checkpoint}; resume with: {_resume_command}"

    def finish(self, model, tokenizer, summary: dict, **samples: list[dict]) -> None:
        """Collective, and the run's end: save the model in the dtype its checkpoint was stored in (load_model's
        stored_dtype) and the tokenizer (via a temporary folder: a kill never leaves half a model), each list of samples
        as <name>.jsonl, then summary.json, which marks a finished run; then leave torchrun's process group."""
        model = unwrap(model)
        self.check_finite("final", **{f"parameter {name}": param.detach() for name, param in model.named_parameters()})
        dtype, state = getattr(model, "stored_dtype", torch.float32), None  # the checkpoint's own dtype
        if sharded(model):  # FSDP: the whole model gathered to rank 0 (collective), saved as a plain folder
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            own = {name for name, _ in itertools.chain(model.named_parameters(), model.named_buffers())}
            state = {k: v.to(dtype) for k, v in state.items() if k in own}  # a tied copy (lm_head = wte) once
        peaks = gather([round(peak_memory_mb(), 1)])  # every process's (collective)
        if rank() == 0:
            tmp = self.dir / ".saving"
            if state is None:
                model.to(dtype)
            model.save_pretrained(tmp, state_dict=state)
            if state is not None:  # save_pretrained wrote the dtype of the sharded (fp32) weights
                model.config.dtype = str(dtype).removeprefix("torch.")
                model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for f in tmp.iterdir():
                os.replace(f, self.dir / f.name)
            tmp.rmdir()
            for name, rows in samples.items():
                write_json(self.dir / f"{name}.jsonl", rows)
            write_json(self.dir / "summary.json", summary | {
                "world_size": world_size(), "peak_memory_mb": round(peak_memory_mb(), 1),
                "wall_time": round(time.time() - self.start, 1)} | (
                {"peak_memory_mb_per_process": peaks} if world_size() > 1 else {}))
            print("summary: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float)))
            self.metrics.close()
            if self.tb:
                self.tb.close()
            if self.wandb:
                self.wandb.finish()
        if dist.is_initialized():
            dist.barrier()  # no rank leaves while rank 0 still saves
            dist.destroy_process_group()


# ======================================================================================================================
# 3. Loading models, tokenizers and data in TRL's formats (from the hub, a local folder or file, or the toy world)
# ======================================================================================================================

TOY = "toy"  # the built-in toy world (section 4) as a model, tokenizer or dataset name


def _check_exists(name_or_path: str, hint: str) -> None:
    """Fail early on a local path that does not exist; anything else may be a hub id."""
    if not os.path.exists(os.path.expanduser(name_or_path)) and (
            name_or_path.startswith((".", "/", "~", "runs/")) or name_or_path.count("/") > 1):
        fail(f"{name_or_path} not found: {hint}")


def load_tokenizer(name_or_path: str, hint: str = "check the path or hub id"):
    """Tokenizer for `toy`, a hub id or a local directory, with a pad token and left padding."""
    if name_or_path == TOY:
        return toy_tokenizer()
    _check_exists(name_or_path, hint)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 (a missing, corrupt or unknown tokenizer: all the user's to fix)
        fail(f"cannot load a tokenizer from {name_or_path} ({str(e).splitlines()[0]}): {hint}")
    if tokenizer.eos_token is None:
        fail(f"the tokenizer of {name_or_path} has no EOS token, which ends every response: set eos_token")
    if tokenizer.pad_token is None:  # e.g. GPT-2, Pythia, Llama: we always mask, so EOS can double as pad
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name_or_path: str, tokenizer, kind: str = "causal", hint: str = "check the path or hub id",
               device: torch.device | str = "cpu", frozen: bool = False, gradient_checkpointing: bool = False):
    """A causal LM ("causal") or a scalar-head classifier ("score") on `device`, dropout off (N+ detail: it would make
    PPO's ratios and a preference pair's scores noisy). A "score" model made from a causal LM starts at 0 (zero head).
    Precision: transformers 5 loads a checkpoint in its stored dtype (bf16 or fp16 for most hub models), and AdamW on
    bf16 weights rounds most small updates away (fp16's second moment underflows). So a trained model holds fp32 master
    weights (and optimizer state) and computes in bf16 under autocast on CUDA; a `frozen` one (reference policy, reward
    model during RL) runs in bf16 on CUDA, half the memory, fp32 on a CPU. `gradient_checkpointing` recomputes each
    layer's activations in the backward pass (it acts in train() mode; generation in eval() mode keeps its KV cache)."""
    if name_or_path == TOY:
        model = toy_model(tokenizer, kind)
    else:
        _check_exists(name_or_path, hint)
        cls = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModelForSequenceClassification
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # a new score head's "weights missing" report is expected
        try:
            model = cls.from_pretrained(name_or_path, **({"num_labels": 1} if kind == "score" else {}))
        except Exception as e:  # noqa: BLE001 (missing, truncated or corrupt weights: the user's to fix)
            fail(f"cannot load a model from {name_or_path} ({str(e).splitlines()[0]}): {hint}")
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
        model.config.pad_token_id = tokenizer.pad_token_id
    if kind == "score" and "Classification" not in str(getattr(model.config, "architectures", None)):
        for param in model.score.parameters():  # weight, and bias where the head has one
            torch.nn.init.zeros_(param)
    for module in model.modules():  # nn.Dropout, and the plain floats some models keep (Llama's attention_dropout,
        if isinstance(module, torch.nn.Dropout):  # OPT's dropout and layerdrop), which act in train() mode
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or name == "layerdrop"):
                setattr(module, name, 0.0)
    model.stored_dtype = next(model.parameters()).dtype  # the checkpoint's: Run.finish saves the model in it
    device = torch.device(device)
    model.to(device=device, dtype=torch.bfloat16 if frozen and device.type == "cuda" else torch.float32)
    if frozen:
        model.requires_grad_(False).eval()
    if gradient_checkpointing:  # non-reentrant: gradients reach the weights even when the inputs need none
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def max_positions(model) -> int:
    """How many positions the model can attend to (prompt + response must fit)."""
    config = getattr(unwrap(model), "classifier", unwrap(model)).config  # a TokenScores holds a classifier
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2**31


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A prompt's ids, with the tokenizer's special tokens (<bos>) unless the text starts with <bos> already, as a
    chat template renders it (Llama, Mistral, Gemma): never two."""
    bos = tokenizer.bos_token
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]


def encode_completion(tokenizer, completion: str, add_eos: bool = True, prompt: str | None = None) -> list[int]:
    """A completion's ids, ending with a stop token: EOS is appended (add_eos) unless the text ends with one already,
    as a chat template's turn does. Given its prompt, the ids of prompt + completion past the prompt's (TRL's rule: a
    tokenizer may merge across the seam, and SentencePiece marks a text's first word); alone, or where the seam changes
    the prompt's ids, the completion's own, with add_special_tokens=False (no second <bos>)."""
    ids = None
    if prompt is not None:
        head, full = encode_prompt(tokenizer, prompt), encode_prompt(tokenizer, prompt + completion)
        ids = full[len(head):] if full[:len(head)] == head else None
    if ids is None:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos and not (ids and ids[-1] in stop_ids(tokenizer)) else ids


def stop_ids(tokenizer) -> list[int]:
    """The tokens that end a response: EOS, the chat template's end of turn (<|im_end|>, <|eot_id|>, <end_of_turn>: the
    first special token it renders after an assistant's reply) and the generation config's EOS ids (maybe several)."""
    return list(_stop_ids(tokenizer, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)))


@functools.lru_cache(maxsize=16)  # computed once per tokenizer, not per row: rendering a chat template is slow
def _stop_ids(tokenizer, eos_token_id: int, chat_template: str | None) -> tuple[int, ...]:
    ids = [eos_token_id]
    with suppress(OSError, ValueError):  # no generation config there (a tokenizer built in memory, a classifier)
        eos = transformers.GenerationConfig.from_pretrained(tokenizer.name_or_path).eos_token_id
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    if chat_template:
        reply = "minrlhf"
        turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": reply}]
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        special = {*tokenizer.all_special_ids, *(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)}
        after = tokenizer(text[text.rfind(reply) + len(reply):], add_special_tokens=False)["input_ids"]
        ids += [i for i in after if i in special][:1]
    return tuple(dict.fromkeys(ids))


def encode_prompts(tokenizer, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Each prompt's ids, left-truncated to its last `max_tokens` (a response continues a prompt's end) so that
    prompt + response fit the model's positions; says how many lost their start."""
    if max_tokens < 1:
        fail(f"--max_new_tokens leaves {max_tokens} of the model's positions to the prompt: lower it")
    queries = [encode_prompt(tokenizer, p) for p in prompts]
    if (cut := sum(len(q) > max_tokens for q in queries)) and rank() == 0:
        print(f"note: {cut} of {len(queries)} prompts are longer than {max_tokens} tokens and lose their start")
    return [q[-max_tokens:] for q in queries]


# Data formats: standard and conversational, explicit or implicit prompt -----------------------------------------------

FORMATS = ("prompt", "prompt/completion", "prompt/chosen/rejected", "chosen/rejected (implicit prompt, HH-RLHF)",
           "messages", "query/responses/scores (RRHF)")
NEEDS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"), "prompts": ("prompt",)}
HH_ASSISTANT = "\n\nAssistant:"


def _render(messages: list[dict], tokenizer, generation_prompt: bool = False) -> str:
    """Messages as text: through the chat template, or (without one) joined HH-style."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return "".join(f"\n\n{m['role'].capitalize()}: {m['content']}" for m in messages) + (
        HH_ASSISTANT if generation_prompt else "")


def _reply(prompt: str | list[dict], reply: str | list[dict], tokenizer) -> str:
    """A completion as text. After a conversational prompt, TRL's rule: render prompt + reply with the chat template
    and cut off the rendered prompt (with its generation prompt), so that the reply ends with the template's
    end-of-turn token; anything after that token (a newline, say) goes, since generation stops at it and the reward
    model reads its score there. Without a template, the reply's content."""
    if isinstance(prompt, str):
        if not isinstance(reply, str):
            raise TypeError("a conversational completion needs a conversational prompt")
        return reply
    if isinstance(reply, str):  # a plain-text answer to a conversation
        reply = [{"role": "assistant", "content": reply}]
    if not getattr(tokenizer, "chat_template", None):
        return reply[-1]["content"]
    head, full = _render(prompt, tokenizer, True), _render(prompt + reply, tokenizer)
    if not full.startswith(head):
        raise ValueError("the chat template does not render prompt + reply as the prompt with its generation prompt, "
                         "then the reply")
    text = full[len(head):]
    ends = [i + len(s) for s in map(tokenizer.decode, stop_ids(tokenizer)) if s and (i := text.find(s)) >= 0]
    return text[:min(ends)] if ends else text


def implicit_prompt(chosen: str | list[dict], rejected: str | list[dict]) -> dict:
    """The prompt that a preference pair without one shares, as TRL finds it, and the two completions after it.
    Messages: every message but the last, an assistant's. Text: the longest common prefix, less a trailing space
    (which goes with the completions); in an HH-RLHF transcript, the prefix up to its last "\n\nAssistant:"."""
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        if (isinstance(chosen, str) or isinstance(rejected, str) or chosen[:-1] != rejected[:-1]
                or {chosen[-1]["role"], rejected[-1]["role"]} != {"assistant"}):
            raise ValueError("conversational chosen and rejected must share every message but the last, the "
                             "assistant's")
        return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    shared = os.path.commonprefix([chosen, rejected])
    if (cut := shared.rfind(HH_ASSISTANT)) >= 0:  # HH-RLHF: the last turn is the assistant's answer
        shared = shared[:cut + len(HH_ASSISTANT)]
    elif shared.endswith(" "):
        shared = shared[:-1]
    return {"prompt": shared, "chosen": chosen[len(shared):], "rejected": rejected[len(shared):]}


def standardize_row(row: dict, tokenizer) -> dict:
    """One row of any of the FORMATS (standard or conversational, with explicit or implicit prompt) as
    {"prompt", "completion", "chosen", "rejected"[, "margin"]} strings (None where missing). A conversational
    prompt is rendered with its generation prompt, and each completion as what the template adds to it."""
    if "query" in row and "responses" in row:  # RRHF: best and worst response by score
        order = sorted(range(len(row["responses"])), key=lambda i: row["scores"][i])
        row = {"prompt": row["query"], "chosen": row["responses"][order[-1]], "rejected": row["responses"][order[0]]}
    elif "messages" in row:  # conversational SFT: the last turn is the completion
        row = {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
    elif "chosen" in row and "rejected" in row and row.get("prompt") is None:
        row = row | implicit_prompt(row["chosen"], row["rejected"])
    elif "prompt" not in row:
        raise ValueError("unknown format")
    prompt = row["prompt"] if isinstance(row["prompt"], str) else _render(row["prompt"], tokenizer, True)
    if row.get("chosen") is not None and row.get("rejected") is not None:
        chosen, rejected = (_reply(row["prompt"], row[k], tokenizer) for k in ("chosen", "rejected"))
        return {"prompt": prompt, "completion": chosen, "chosen": chosen, "rejected": rejected,
                **({"margin": row["margin"]} if "margin" in row else {})}
    completion = row.get("completion")
    completion = None if completion is None else _reply(row["prompt"], completion, tokenizer)
    return {"prompt": prompt, "completion": completion, "chosen": None, "rejected": None}


def _load_splits(name: str, config: str | None):
    """A DatasetDict from a save_to_disk folder, a .json/.jsonl/.parquet file, or the hub."""
    if os.path.isdir(name):
        for state in [Path(name, "state.json"), *Path(name).glob("*/state.json")]:  # datasets fails on these vaguely
            if state.exists() and not json.loads(state.read_text()).get("_data_files"):
                split = state.parent.name if state.parent != Path(name) else "train"
                fail(f"dataset {name} has an empty {split!r} split")
        loaded = datasets.load_from_disk(name)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    if not name.endswith((".json", ".jsonl", ".parquet")):
        return datasets.load_dataset(name, config)
    if not os.path.exists(name):
        fail(f"dataset file {name} not found")
    if name.endswith((".json", ".jsonl")):  # name the line of a malformed row, which datasets does not
        lines = [(i, line) for i, line in enumerate(Path(name).read_text().split("\n"), 1) if line.strip()]
        for i, line in lines if name.endswith(".jsonl") else []:
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"dataset file {name}, line {i}: not valid JSON ({e.msg})")
        if not lines:
            fail(f"dataset file {name} is empty")
    return datasets.load_dataset("parquet" if name.endswith(".parquet") else "json", data_files=name)


def load_data(name: str, stage: str, tokenizer, config: str | None = None, train_split: str = "train",
              test_split: str = "test", test_rows: int = 256, max_train_rows: int | None = None):
    """Train and test rows standardized for a stage: "sft" (prompt, completion), "preference" (prompt, chosen,
    rejected[, margin]) or "prompts" (prompt[, completion]). `name`: `toy`, a hub id, a .json/.jsonl/.parquet file
    or a save_to_disk folder. Without a test split, the last `test_rows` rows of train (at most half) are held out."""
    try:
        splits = toy_dataset(stage) if name == TOY else _load_splits(name, config)
    except Exception as e:  # noqa: BLE001 (unreadable data: the user's to fix)
        fail(f"cannot load dataset {name} ({str(e).splitlines()[0]})")
    if train_split not in splits:
        fail(f"dataset {name} has no split {train_split!r} (it has {list(splits)}): pass --dataset_train_split")
    train, test = splits[train_split], splits.get(test_split)
    if test is None:  # hold out the last rows, at most half of a small dataset
        if (held_out := min(test_rows, len(train) // 2)) == 0:
            fail(f"dataset {name} has {len(train)} rows in split {train_split!r}: too few to train and evaluate")
        test, train = train.select(range(len(train) - held_out, len(train))), train.select(range(len(train) - held_out))
    if len(train) == 0 or len(test) == 0:
        fail(f"dataset {name} has an empty {train_split if len(train) == 0 else test_split!r} split")
    test = test.select(range(min(test_rows, len(test))))
    train = train.select(range(min(max_train_rows or len(train), len(train))))
    return _standardize(train, name, stage, tokenizer), _standardize(test, name, stage, tokenizer)


def _standardize(dataset, name: str, stage: str, tokenizer) -> list[dict]:
    columns, formats = dataset.column_names, ", ".join(FORMATS)
    try:
        rows = [standardize_row(row, tokenizer) for row in dataset]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        fail(f"dataset {name} has columns {columns}, which fit no accepted format ({e}); accepted: {formats}")
    if missing := [k for k in NEEDS[stage] if not rows or rows[0][k] is None]:
        fail(f"dataset {name} has columns {columns}, but the {stage} stage needs {', '.join(missing)}; "
             f"accepted formats: {formats}")
    return rows


# ======================================================================================================================
# 4. The toy world: a word-level grammar of movie reviews with a known gold reward. A copier deletes from here
#    to the end of the file; nothing above reaches it but a `toy` model, tokenizer or dataset name.
# ======================================================================================================================

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
NOUNS = ("movie film plot story acting cast ending music script dialogue pacing soundtrack director camera "
         "humor villain hero scenery costumes effects sequel finale characters editing writing lighting").split()
ADJECTIVES = {  # valence of each adjective, -2 .. +2
    **dict.fromkeys("great amazing wonderful brilliant superb excellent fantastic beautiful stunning".split(), 2.0),
    **dict.fromkeys("good fun nice charming solid clever enjoyable pleasant".split(), 1.0),
    **dict.fromkeys("okay fine average ordinary predictable long short".split(), 0.0),
    **dict.fromkeys("bad poor boring slow weak bland silly dull messy mediocre confusing".split(), -1.0),
    **dict.fromkeys("awful terrible horrible dreadful painful".split(), -2.0),
}
VERBS = {  # past tense -> (base form, valence)
    "loved": ("love", 2.0), "adored": ("adore", 2.0), "liked": ("like", 1.0), "enjoyed": ("enjoy", 1.0),
    "watched": ("watch", 0.0), "disliked": ("dislike", -1.0), "hated": ("hate", -2.0), "regretted": ("regret", -2.0),
}
INTENSIFIERS = {"very": 1.5, "really": 1.5, "truly": 1.5, "extremely": 2.0, "quite": 1.2,
                "somewhat": 0.5, "slightly": 0.5}
ADVERBS = {"really": 1.5, "truly": 1.5, "honestly": 1.0, "mostly": 0.5}
VALENCE = {**ADJECTIVES, **{past: v for past, (_, v) in VERBS.items()}, **{base: v for base, v in VERBS.values()}}
MULTIPLIER = {**INTENSIFIERS, **ADVERBS}
NEGATION = -0.5  # "not great" is mildly negative, "not bad" mildly positive
EXPERT_DRAFTS = 4  # an RL prompt's demonstration is the best of this many grammar samples by gold (toy_dataset)

# A sentence form is a list of slots; a slot is a word or a tuple of choices ("" = skip it).
_ADJ_PHRASE = [("", "", "not"), ("", "") + tuple(INTENSIFIERS), tuple(ADJECTIVES), "."]
SENTENCE_FORMS = [["the", tuple(NOUNS), "was", *_ADJ_PHRASE], ["it", "was", *_ADJ_PHRASE]]
for _object in (["it"], ["the", tuple(NOUNS)]):
    SENTENCE_FORMS += [["i", ("", "", "") + tuple(ADVERBS), tuple(VERBS), *_object, "."],
                       ["i", "did", "not", tuple(b for b, _ in VERBS.values()), *_object, "."]]


def _grammatical_sentences() -> dict[tuple[str, ...], float]:
    """Every sentence the forms produce (about 19k, so checking grammar is a dict lookup), with its
    valence: the sentiment word's valence times each intensifier or adverb, times NEGATION for "not"."""
    table = {}
    for form in SENTENCE_FORMS:
        for words in itertools.product(*[(slot,) if isinstance(slot, str) else slot for slot in form]):
            sentence = tuple(w for w in words if w)
            value = next(VALENCE[w] for w in sentence if w in VALENCE)
            for w in sentence:
                value *= MULTIPLIER.get(w, 1.0) * (NEGATION if w == "not" else 1.0)
            table[sentence] = value
    return table


SENTENCE_VALENCE = _grammatical_sentences()
TOY_WORDS = sorted({w for sentence in SENTENCE_VALENCE for w in sentence})


def _sample_sentence(rng: random.Random, prefix: list[str]) -> list[str] | None:
    """Sample one sentence whose first words are `prefix` (None if the chosen form cannot match)."""
    words = []
    for slot in rng.choice(SENTENCE_FORMS):
        choices = (slot,) if isinstance(slot, str) else slot
        if len(words) < len(prefix):  # forced: keep the prefix's word, or skip an optional slot
            want = prefix[len(words)]
            choices = (want,) if want in choices else tuple(c for c in choices if c == "")
            if not choices:
                return None
        words += [w] if (w := rng.choice(choices)) else []
    return words if words[:len(prefix)] == prefix else None  # a skipped slot can miss the prefix


def sample_review(rng: random.Random, prefix: list[str] = ()) -> list[str]:
    """A review of 1-6 grammatical sentences (a list of words) that starts with `prefix`."""
    while (words := _sample_sentence(rng, list(prefix))) is None:
        pass
    for _ in range(rng.randint(0, 5)):
        words += _sample_sentence(rng, [])  # with no prefix every form matches
    return words


def split_sentences(text: str) -> list[list[str]]:
    """Split text into sentences at "."; a trailing fragment without "." is its own sentence."""
    sentences = [[]]
    for w in text.split():
        sentences[-1].append(w)
        if w == ".":
            sentences.append([])
    return [s for s in sentences if s]


def gold_reward(prompt: str, completion: str) -> float:
    """The toy world's true reward of a review: the mean valence of its well-formed, distinct
    sentences, minus 2 per malformed sentence and 1 per repeated sentence."""
    sentences = [tuple(s) for s in split_sentences(f"{prompt} {completion}")]
    grammatical = [s for s in sentences if s in SENTENCE_VALENCE]
    distinct = dict.fromkeys(grammatical)  # first occurrences, in order
    mean = sum(SENTENCE_VALENCE[s] for s in distinct) / len(distinct) if distinct else 0.0
    return mean - (2.0 * (len(sentences) - len(grammatical)) + (len(grammatical) - len(distinct)))


def well_formed(prompt: str, completion: str) -> float:
    """Fraction of the review's sentences that are grammatical (0 for an empty review)."""
    sentences = split_sentences(f"{prompt} {completion}")
    return sum(tuple(s) in SENTENCE_VALENCE for s in sentences) / max(len(sentences), 1)


def gold_metrics(samples: list[dict]) -> dict:
    """Add the gold reward and well-formed rate to each sample (prompt, response); return their means."""
    for s in samples:
        s["gold"], s["well_formed"] = gold_reward(s["prompt"], s["response"]), well_formed(s["prompt"], s["response"])
    return {k: sum(s[k] for s in samples) / len(samples) for k in ("gold", "well_formed")}


def toy_tokenizer():
    """Word-level tokenizer over the toy vocabulary, as a transformers fast tokenizer that prepends <bos>."""
    vocab = {w: i for i, w in enumerate([PAD, BOS, EOS, UNK] + TOY_WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS,
                                                eos_token=EOS, unk_token=UNK, padding_side="left")


def toy_model(tokenizer, kind: str = "causal"):
    """A ~0.8M-parameter GPT-2 over the toy vocabulary, randomly initialized, dropout off; `kind` as in load_model."""
    # "gelu" (one fused op), not GPT-2's "gelu_new" (a tanh formula of eight): faster passes on a CPU
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_layer=4, n_head=4, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, num_labels=1)
    auto = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModelForSequenceClassification
    # the run's seed, the same on every rank, not the RNG's state: a run's policy and reference start equal
    with torch.random.fork_rng():
        torch.manual_seed(torch.initial_seed() - rank() * SEED_STRIDE)
        return auto.from_config(config)


@functools.cache
def toy_dataset(kind: str, seed: int = 0, n_train: int | None = None, n_test: int = 256, k: float = 3.0,
                c: float = 0.1):
    """Deterministic toy datasets in TRL's formats. "sft" (4000 training rows): prompt (a review's first 2-4 words),
    completion (the rest). "prompts" (4000): the same prompts, but the completion is an expert's demonstration: the
    best by gold of EXPERT_DRAFTS reviews that start with the prompt (the row's own review first), better than the SFT
    data as human demonstrations are better than a small SFT model. "preference" (8000 pairs): prompt, chosen,
    rejected, gold_chosen_better: two reviews labeled by an annotator with P(a > b) = sigmoid(k (gold_a - gold_b) +
    c (len_a - len_b)): noisy, and partial to length (k, c and the pairs: benchmark/RESULTS.md's annotator sweep)."""
    if n_train is None:
        n_train = 8000 if kind == "preference" else 4000
    rng = random.Random(f"{kind}-{seed}")
    drafts_rng = random.Random(f"{kind}-{seed}-drafts")  # its own stream: the same prompts for any EXPERT_DRAFTS

    def row() -> dict:
        review = sample_review(rng)
        cut = rng.randint(2, min(4, len(review) - 1))
        prompt, a = " ".join(review[:cut]), review[cut:]
        if kind == "sft":
            return {"prompt": prompt, "completion": " ".join(a)}
        if kind == "prompts":  # an expert's demonstration: the best of its drafts by gold
            drafts = [a] + [sample_review(drafts_rng, review[:cut])[cut:] for _ in range(EXPERT_DRAFTS - 1)]
            best = max(drafts, key=lambda d: gold_reward(prompt, " ".join(d)))
            return {"prompt": prompt, "completion": " ".join(best)}
        b = sample_review(rng, review[:cut])[cut:]
        ga, gb = gold_reward(prompt, " ".join(a)), gold_reward(prompt, " ".join(b))
        # clipped so that exp() cannot overflow for a large k (no effect at the defaults)
        logit = max(-50.0, min(50.0, k * (ga - gb) + c * (len(a) - len(b))))
        a_wins = rng.random() < 1 / (1 + math.exp(-logit))
        chosen, rejected = (a, b) if a_wins else (b, a)
        return {"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected),
                "gold_chosen_better": (ga >= gb) == a_wins}

    return datasets.DatasetDict({split: datasets.Dataset.from_list([row() for _ in range(n)])
                                 for split, n in (("train", n_train), ("test", n_test))})
