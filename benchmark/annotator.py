"""Run one stage with the toy preference data relabeled by another simulated annotator.

The toy labels come from P(a > b) = sigmoid(k (gold_a - gold_b) + c (len_a - len_b)) with k=2 (label
noise) and c=0.1 (length bias): common.toy_dataset's defaults. What PPO on a learned reward model can
gain in gold depends on these two numbers, mostly on c/k, the gold reward one token of length is
worth to the annotator. This wrapper runs a script of this repository (a path relative to its root)
with other values of k and c, and records them in the run's folder as annotator.json:

    python benchmark/annotator.py 3 0.1 reward_model.py --output_dir runs/bench/annotator/rm_k3_c0.1
    python ppo.py --reward_model_path runs/bench/annotator/rm_k3_c0.1 --total_episodes 3200 \\
        --output_dir runs/bench/annotator/ppo_k3_c0.1

Only the `preference` data changes (the same pairs, new labels); SFT data and prompts stay as they
are. benchmark/annotator.sh runs the README's sweep.
"""

import functools
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common

if __name__ == "__main__":
    if len(sys.argv) < 4:
        print("usage: python benchmark/annotator.py K C SCRIPT [ARGS...]  (SCRIPT relative to the repository root)",
              file=sys.stderr)
        sys.exit(2)
    k, c, script, args = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
    default = common.toy_dataset
    relabeled = functools.partial(default, k=k, c=c)
    common.toy_dataset = lambda kind, *a, **kw: (relabeled if kind == "preference" else default)(kind, *a, **kw)
    sys.argv = [script, *args]
    runpy.run_path(str(ROOT / script), run_name="__main__")
    if "--output_dir" in args:
        common.write_json(Path(args[args.index("--output_dir") + 1]) / "annotator.json", {"k": k, "c": c})
