"""What fits on one 80 GB GPU: ppo.py's PPO training of four real model shapes, from the per-token bytes autograd
saves for backward, measured on the CPU under bf16 autocast with random weights (RESULTS.md, "Memory at a real
vocabulary", says how; its generated block is this script's output).
"""

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common

FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "tie_word_embeddings")
SHAPES = {name: (config_cls, dict(zip(FIELDS, values))) for name, config_cls, *values in (  # their Hub config.json
    ("HuggingFaceTB/SmolLM2-135M", transformers.LlamaConfig, 576, 1536, 30, 9, 3, 49152, True),
    ("Qwen/Qwen2.5-0.5B", transformers.Qwen2Config, 896, 4864, 24, 14, 2, 151936, True),
    ("meta-llama/Llama-3.2-1B", transformers.LlamaConfig, 2048, 8192, 16, 32, 8, 128256, True),
    ("Qwen/Qwen2.5-7B", transformers.Qwen2Config, 3584, 18944, 28, 28, 4, 152064, False))}
B, T = 2, 64  # the measured batch: 2 rows x 64 tokens, row 0 left-padded by one token (as ppo.py's prompts are)
PROMPT, RESPONSES, ROWS, MINIBATCH, BUDGET = 512, (48, 512), 64, 32, 72e9  # 80 GB less 10% headroom
CASTS = {"TBackward0", "ToCopyBackward0", "ViewBackward0", "PermuteBackward0", "TransposeBackward0", "ExpandBackward0"}


def weight_copy(t: torch.Tensor) -> bool:
    """Whether t is autocast's bf16 copy of a weight (or a view of one): saved once per forward, not per token."""
    fn = t.grad_fn
    while type(fn).__name__ in CASTS:
        fn = fn.next_functions[0][0]
    return t.grad_fn is not None and type(fn).__name__ == "AccumulateGrad"


def saved(run, modules, checkpointed_layers=()) -> tuple[int, int, list]:
    """Run run() under CPU bf16 autocast; return the bytes autograd saves for backward, each storage once: activations,
    autocast's weight copies, and the activations' (bytes, dtype); parameters cost nothing more. Non-reentrant
    checkpointing keeps a layer's inputs in its recompute closure, not as saved tensors: a pre-hook counts them."""
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    seen = {}

    def add(t, weight=False):
        storage = t.untyped_storage()  # held in `seen`, so that no freed address is reused and miscounted
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), (storage, weight, t.dtype))

    def pack(t):
        add(t, weight_copy(t))
        return t.detach()  # not t: a node that saves its own output would hold itself (a cycle no gc can see)

    def inputs(_module, args, kwargs):
        for x in [*args, *kwargs.values()]:
            for t in x if isinstance(x, tuple) else (x,):
                if isinstance(t, torch.Tensor):
                    add(t)

    hooks = [layer.register_forward_pre_hook(inputs, with_kwargs=True) for layer in checkpointed_layers]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        _graph = run()  # holds the graph, and so the saved tensors, until the counts are taken
    for hook in hooks:
        hook.remove()
    acts = [(s.nbytes(), dtype) for s, weight, dtype in seen.values() if not weight]
    return sum(n for n, _ in acts), sum(s.nbytes() for s, weight, _ in seen.values() if weight), acts


def batch(tokens: int, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = torch.randint(0, 256, (B, tokens)), torch.ones(B, tokens, dtype=torch.long)
    mask[0, 0] = 0 if padded else 1
    return ids, mask


def measure(config_cls, shape: dict) -> dict:
    """Per-token bytes of one shape: `layer` (plain, per token, at T tokens), `grow` (its growth per context token),
    `unpadded`, `ckpt` (per layer), `policy_rest` (per position), `logit` (per response token), `value_rest`."""
    cfg = config_cls(**(shape | {"num_hidden_layers": 1, "vocab_size": 256}))
    model = transformers.AutoModelForCausalLM.from_config(cfg).train()  # dropout is 0 in these configs
    layers = model.model.layers
    layers.append(layers[0])  # layer 2 is layer 1 again: the same weights, activations of its own
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types * 2

    def policy_saved(tokens, n_layers, padded=True, context=None, checkpointed=()):
        model.config.num_hidden_layers = n_layers  # the models run layers[:num_hidden_layers]
        ids, mask = batch(tokens, padded)
        if context is None:  # the decoder stack and a 256-word head: what a layer adds
            return saved(lambda: common.forward(model, ids, mask).logits, [model], checkpointed)
        return saved(lambda: common.response_logprobs(model, ids, mask, context), [model])

    def per_layer(tokens, padded=True, checkpointed=()):
        return (policy_saved(tokens, 2, padded, checkpointed=checkpointed)[0]
                - policy_saved(tokens, 1, padded, checkpointed=checkpointed)[0]) / (B * tokens)

    m = {"layer": per_layer(T), "unpadded": per_layer(T, padded=False)}
    m["grow"] = (m["layer"] - per_layer(T // 2)) / (T - T // 2)
    _, weights, _ = policy_saved(T, 1)
    m["weight_copy"] = weights / sum(x.weight.numel() for x in model.modules() if isinstance(x, torch.nn.Linear))

    small_head, vocab = model.lm_head, shape["vocab_size"]  # the real head, at the real vocabulary, for the logits
    model.lm_head = torch.nn.Linear(shape["hidden_size"], vocab, bias=False)
    (long_r, _, storages), (short_r, _, _) = policy_saved(T, 1, context=T // 2), policy_saved(T, 1, context=3 * T // 4)
    model.lm_head = small_head
    m["logit"] = (long_r - short_r) / (B * (T // 2 - T // 4))
    m["policy_rest"] = (long_r / B - T * m["layer"] - T // 2 * m["logit"]) / T
    m["full_logits_saved"] = any(n >= B * T * vocab * 2 and dtype == torch.bfloat16 for n, dtype in storages)

    value = common.TokenScores(SimpleNamespace(base_model=model.model,  # ppo.py's value model, one layer
                                               score=torch.nn.Linear(shape["hidden_size"], 1, bias=False)))
    model.config.num_hidden_layers = 1
    ids, mask = batch(T)
    m["value_rest"] = (saved(lambda: value(ids, mask), [model, value.classifier.score])[0] / B - T * m["layer"]) / T

    model.activation_checkpointing_enable({"use_reentrant": False})  # as common.load_model does
    m["ckpt"] = per_layer(T, checkpointed=layers[:1])  # layers[0] is layers[1] too
    return m


def counts(config_cls, shape: dict) -> SimpleNamespace:
    """Parameter counts from the config, on the meta device (no memory): policy, value (= reward) model, and the
    matmul weights of both, which autocast copies to bf16 (embeddings and norms it does not)."""
    cfg = config_cls(**shape, num_labels=1)
    with torch.device("meta"):
        policy = transformers.AutoModelForCausalLM.from_config(cfg)
        value = transformers.AutoModelForSequenceClassification.from_config(cfg)
    linear = [x for model in (policy, value) for x in model.modules() if isinstance(x, torch.nn.Linear)]
    return SimpleNamespace(policy=sum(p.numel() for p in policy.parameters()),
                           value=sum(p.numel() for p in value.parameters()),
                           matmul=sum(x.weight.numel() for x in linear))


def verdict(static: float, per_row: dict) -> str:
    """The minibatch in one micro-batch if it fits, else the largest power of two, else the same checkpointed."""
    for ckpt in (False, True):
        for micro in (MINIBATCH, 16, 8, 4, 2, 1):
            if static + micro * per_row[ckpt] <= BUDGET:
                flags = [f"--micro_batch_size {micro}"] * (micro < MINIBATCH) + ["--gradient_checkpointing"] * ckpt
                return " ".join(flags) or "fits, no split"
    return "sharding (--fsdp)"  # static alone over the budget, or not one row fits


def main():
    argparse.ArgumentParser(description=__doc__).parse_args()  # --help; there are no options
    torch.manual_seed(0)
    start, k = time.time(), lambda x: f"{x / 1e3:,.1f}k"
    print(f"torch {torch.__version__}, transformers "
          f"{transformers.__version__}. Per-token bytes measured with saved_tensors_hooks under CPU bf16 autocast "
          "(fp32 weights; each saved storage once; parameters and autocast's bf16 weight copies apart), random "
          f"weights, on {B} rows x {T} tokens with row 0 left-padded by one token, as ppo.py's prompts are (attention "
          "then takes a mask and repeats the key/value heads). Per layer: a 2-layer minus a 1-layer model. Rest: "
          "embedding, RoPE, final norm, head input (policy: common.response_logprobs; value: common.TokenScores). "
          "Logits: the LM head at the real vocabulary V, two response lengths R at the same T.\n")
    print("| model | layers | per layer, plain: B/token at T=64, + growth per T | per layer, no padding | "
          "per layer, checkpointed | rest per position: policy / value | logits saved, B per response token | "
          "full (T, V) logits saved | bf16 weight copies, B per matmul weight |\n" + "|---" * 9 + "|")
    results = {}
    for name, (config_cls, shape) in SHAPES.items():
        m = results[name] = measure(config_cls, shape)
        print(f"| {name} | {shape['num_hidden_layers']} | {k(m['layer'])} + {m['grow']:.1f} x T | {k(m['unpadded'])} | "
              f"{k(m['ckpt'])} | {k(m['policy_rest'])} / {k(m['value_rest'])} | {k(m['logit'])} | "
              f"{'yes' if m['full_logits_saved'] else 'no'} | {m['weight_copy']:.2f} |")

    print(f"\nPer GPU: {ROWS} prompts per process, {ROWS // MINIBATCH} minibatches of {MINIBATCH} rows, a {PROMPT}-"
          f"token prompt + R response tokens (T = {PROMPT} + R). Fits: at most {BUDGET / 1e9:.0f} GB (80 GB - 10%).\n")
    print("| model | params (policy + value) | R | static GB | act. GB per row (plain / checkpointed) | "
          f"KV cache GB ({ROWS} rows) | verdict |\n" + "|---" * 7 + "|")
    for name, (config_cls, shape) in SHAPES.items():
        m, n, layers, vocab = results[name], counts(config_cls, shape), shape["num_hidden_layers"], shape["vocab_size"]
        static = (16 + 2) * (n.policy + n.value) + 2 * n.matmul  # trained + frozen copies, autocast's weight copies
        head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        for r in RESPONSES:
            t = PROMPT + r
            plain = m["layer"] + m["grow"] * (t - T)  # per layer per token at this T (the padding mask grows with T)
            logit_transient = max(2 * vocab * t + 4 * vocab * r, 12 * vocab * r)
            per_row = {ckpt: t * (2 * layers * (m["ckpt"] if ckpt else plain) + m["policy_rest"] + m["value_rest"])
                       + m["logit"] * r + logit_transient + t * plain * ckpt for ckpt in (False, True)}
            kv = 2 * layers * shape["num_key_value_heads"] * head_dim * t * 2 * ROWS
            print(f"| {name} | {n.policy / 1e9:.2f}B + {n.value / 1e9:.2f}B | {r} | {static / 1e9:.1f} | "
                  f"{per_row[False] / 1e9:.2f} / {per_row[True] / 1e9:.2f} | {kv / 1e9:.1f} | "
                  f"{verdict(static, per_row)} |")
    print(f"""
- static = 16 B x (policy + value params) [fp32 weights, grads, AdamW's two moments] + 2 B x (reference + reward
  params) [bf16] + 2 B x the trained models' matmul weights [autocast's bf16 copies, cached through the forward and
  saved for backward: last column above]. Parameter counts from the configs, built on the meta device.
- The policy's logits cover only the R response positions: per response token it saves the fp32 logits / temperature
  that logsumexp keeps (4 B x V) and its result; the full (T, V) bf16 logits are not among the saved tensors.
- act. per row = T x (2 models x (layers x per layer + rest)) + R x logits saved + the logits' peak beyond what is
  saved, max(2 B x V x T + 4 B x V x R, 12 B x V x R), read from the code, not measured. Forward: the bf16 logits at
  all T positions (`[:, context_len - 1:-1]` is a view, so the (T, V) tensor lives until response_logprobs returns;
  it is not saved) and one fp32 R x V temporary (the .float() copy, then logsumexp's `(self - max).exp_()`) next to
  the saved fp32 logits / temperature. Backward: logsumexp's `grad * (self - result).exp()`, three fp32 R x V
  temporaries. Checkpointed: + one layer's plain activations, recomputed in the backward pass. All counted as alive
  at once, an upper bound: the value model's forward follows the policy's log-probs, its backward precedes them.
- Not counted: the generation KV cache (its column: generation runs all {ROWS} local rows at once, next to the static
  part, before any training activations), AdamW's foreach temporaries at the step (about 4 B per trained parameter,
  once activations are freed), the CUDA context and fragmentation (the 10% headroom).
- "sharding (--fsdp)": not one checkpointed row fits, or the static part alone is over the budget: with --fsdp
  over N GPUs the trained models' 16 B per parameter become 16 / N (README, Multiple GPUs).

Measured in {time.time() - start:.0f} s.""")


if __name__ == "__main__":
    main()
