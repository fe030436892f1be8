"""DPO, PPO and GRPO side by side: one base, one reward model, the plays' preference pairs, the same held-out table.

    python train.py configs/tiny.py --max_iters=1500 --out_dir=out/tiny-1500     # the base (once)
    python bench/compare_rlhf.py --base out/tiny-1500                            # reward model, then the three runs
    python bench/compare_rlhf.py --base out/tiny-1500 --skip-train               # only re-measure out/cmp_rl_*
    python bench/compare_rlhf.py --base out/tiny-1500 --max_iters=40             # any --key=value goes to every run

The reward model (configs/reward.py) is trained first unless --reward names one. Each method then runs as
`python train.py configs/<kind>.py --init_from=BASE --out_dir=out/cmp_rl_<kind>` (PPO and GRPO with
--reward_from) in its own process, and every trained policy is measured by the same code
(nanoft/objectives/rl_eval.py) against the same reference, the base: on the 300 held-out prompts, the reward
model's mean score of greedy and sampled responses, the share that stop, KL(pi || pi_ref) per response on the
policy's samples, and the held-out preference accuracy of the model's own likelihoods. Sampling settings are
configs/ppo.py's for all three (temperature 0.7, at most 24 new tokens, a response ends at a newline).
Columns also: wall (the train.py process, start to exit, its own final report included) and peak RSS (that
process's maximum resident set, os.wait4; the Python interpreter and torch's libraries are ~0.3-0.5 GB of it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from nanoft.config import load_config
from nanoft.data.preferences import load_preference_splits
from nanoft.interop.pretrained import load_pretrained, resolve_base
from nanoft.objectives.reward import load_reward_model
from nanoft.objectives.rl_eval import evaluate
from sample import load_model

KINDS = ("dpo", "ppo", "grpo")


def run(config: str, out_dir: str, overrides: list[str]) -> tuple[float, int]:
    """train.py in a fresh process, its output in out_dir.log: (wall seconds, peak RSS bytes of that process)."""
    log = Path(out_dir).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), config, f"--out_dir={out_dir}", "--overwrite=True", *overrides]
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"error: {' '.join(cmd)} failed; see {log}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="out/tiny-1500")
    p.add_argument("--reward", default="", help="a finetune=reward checkpoint (default: train out/cmp_rl_reward)")
    p.add_argument("--runs", default="out", help="where the runs go: RUNS/cmp_rl_<kind>")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--measure", default=",".join(KINDS), help="which runs to measure here (PPO and GRPO runs print "
                   "the same table at their end, by the same code)")
    args, overrides = p.parse_known_args()
    reward = args.reward or f"{args.runs}/cmp_rl_reward"
    costs = {}
    if not args.skip_train:
        if not args.reward:
            run("configs/reward.py", reward, [f"--init_from={args.base}"])
        for kind in KINDS:
            extra = [f"--reward_from={reward}"] if kind != "dpo" else []
            costs[kind] = run(f"configs/{kind}.py", f"{args.runs}/cmp_rl_{kind}", [f"--init_from={args.base}", *extra, *overrides])

    cfg = resolve_base(load_config(str(ROOT / "configs/ppo.py"), [f"--init_from={args.base}", f"--reward_from={reward}"]), {})
    torch.manual_seed(cfg.seed)
    _, val_pairs = load_preference_splits(cfg)
    reward_model = load_reward_model(reward)
    reference = load_pretrained(dataclasses.replace(cfg, finetune="none", finetune_weights="full"), args.base).eval()
    rows, before = [], None
    for kind in args.measure.split(","):
        policy = load_model(f"{args.runs}/cmp_rl_{kind}").eval()
        ev = evaluate(policy, lambda: contextlib.nullcontext(reference), reward_model, val_pairs, cfg, before)
        before = ev.before  # the same reference, measured once
        print(f"--- {kind}\n{ev.table()}", flush=True)
        wall, rss = costs.get(kind, (float("nan"), 0))
        rows.append((kind, ev, wall, rss))
    if not rows:
        return
    b = rows[0][1].before
    print("\n| method | preference acc. (own) | RM score greedy | RM score sampled | stop | KL/response | wall | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| reference (the base) | {b.preference_accuracy:.3f} | {b.greedy_score:+.3f} | {b.sampled_score:+.3f} | "
          f"{b.stopped:.3f} | 0 | | |")
    for kind, ev, wall, rss in rows:
        a = ev.after
        print(f"| {kind} | {a.preference_accuracy:.3f} | {a.greedy_score:+.3f} | {a.sampled_score:+.3f} | "
              f"{a.stopped:.3f} | {ev.kl:.3f} | {wall:.0f} s | {rss / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
