"""Run a script of this repository with the toy preference data relabeled by another simulated annotator,
P(a > b) = sigmoid(k (gold_a - gold_b) + c (len_a - len_b)), and optionally more pairs (the first ones unchanged);
the SFT data and prompts stay as they are. k, c and pairs are recorded as annotator.json in the run's folder.

    python benchmark/annotator.py 3 0.1 4000 reward_model.py --output_dir runs/bench/annotator/rm_k3_c0.1_n4000_s1
"""

import functools
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common

if __name__ == "__main__":
    if len(sys.argv) < 5:
        print("usage: python benchmark/annotator.py K C PAIRS SCRIPT [ARGS...]  (SCRIPT relative to the repository "
              "root)", file=sys.stderr)
        sys.exit(2)
    try:
        k, c, pairs = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    except ValueError:
        pairs = 0
    if pairs < 1:
        print(f"error: K and C must be numbers and PAIRS a positive whole number, not {' '.join(sys.argv[1:4])}",
              file=sys.stderr)
        sys.exit(2)
    script, args = sys.argv[4], sys.argv[5:]
    if not (ROOT / script).is_file():
        print(f"error: {script} is not a script of this repository", file=sys.stderr)
        sys.exit(2)
    default = common.toy_dataset
    relabeled = functools.partial(default, k=k, c=c, n_train=pairs)
    common.toy_dataset = lambda kind, *a, **kw: (relabeled if kind == "preference" else default)(kind, *a, **kw)
    sys.argv = [script, *args]
    runpy.run_path(str(ROOT / script), run_name="__main__")
    if "--output_dir" in args:
        out = Path(args[args.index("--output_dir") + 1])
        common.write_json(out / "annotator.json", {"k": k, "c": c, "pairs": pairs})
