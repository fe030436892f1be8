"""Full fine-tuning, LoRA, QLoRA, prefix tuning and adapters side by side, on one base and the embedded speaker task.

    python train.py configs/tiny.py              # the base, out/tiny (once)
    python bench/compare_finetune.py             # trains configs/{full,lora,qlora,prefix,adapter}.py, prints the table
    python bench/compare_finetune.py --skip-train        # only re-measure runs already in out/cmp_*
    python bench/compare_finetune.py --max_iters=20      # any --key=value is passed to every run

Each run is `python train.py configs/<kind>.py --out_dir=out/cmp_<kind>` in its own process. Columns:
  trainable     parameters with requires_grad (nanoft.peft.lora_model.count_params; NF4 weights count as their elements;
                prefix tuning: its MLP, which trains, not the fewer folded prefixes it saves)
  optim state   bytes of the optimizer state tensors in the run's final checkpoint (what the run really held)
  peak tensors  nanoft.tools.memory.command.measure(cfg): the peak bytes held by torch's allocator over one training step
                (CPU: torch.profiler allocator events; CUDA: max_memory_allocated), batches of block_size tokens
  peak RSS      the train.py process's maximum resident set size (os.wait4's ru_maxrss): includes the Python
                interpreter and torch's libraries (~0.3-0.5 GB), so it differs little between small runs
  wall          the train.py process, start to exit: startup, training, evaluation and its final scoring
  val loss      the run's last val loss (response tokens only), from its metrics.jsonl
  answers       greedy decoding on the val split's first 300 prompts (nanoft.objectives.sft_eval.score_answers): the share
                that answers with one of the six names and stops, and the share that names the right one
  rank acc      speaker-task accuracy by ranking the six names by log-likelihood (nanoft.objectives.sft_eval.score_speaker_task),
                beside the base checkpoint's and the majority baseline
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from nanoft.config import Config, load_config, parse_overrides
from nanoft.data.sft import load_sft_splits
from nanoft.interop.pretrained import load_pretrained
from nanoft.model import GPT
from nanoft.objectives import method_of
from nanoft.objectives.sft_eval import SCORED_EXAMPLES, majority_baseline, score_answers, score_speaker_task
from nanoft.peft.lora_model import count_params
from nanoft.run import checkpoint

KINDS = ("full", "lora", "qlora", "prefix", "adapter")


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def train(kind: str, out_dir: str, overrides: list[str]) -> tuple[float, int]:
    """Run train.py in a fresh process: (wall seconds, peak RSS bytes of that process alone)."""
    log = Path(out_dir).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "train.py", f"configs/{kind}.py", f"--out_dir={out_dir}", *overrides]
    print(" ".join(cmd[1:]), f"> {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the max over all children
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-2000:])
    return wall, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def load_run(out_dir: str) -> tuple[torch.nn.Module, Config, checkpoint.Checkpoint]:
    """The fine-tuned model of a run, as sample.py would load it (adapters applied to their base)."""
    ck = checkpoint.load(out_dir)
    cfg = dataclasses.replace(Config.from_dict(ck.config), dropout=0.0, lora_dropout=0.0)
    peft = method_of(cfg).peft(cfg)
    if peft:
        model = peft.apply(load_pretrained(cfg, ck.base_from), cfg, for_training=False)
        peft.load(model, ck.model, {})
    else:
        model = GPT(cfg)
        checkpoint.load_weights(model, ck.model, out_dir)
    return model, cfg, ck


def optimizer_state_bytes(ck: checkpoint.Checkpoint) -> int:
    if ck.optim is None:
        return 0
    return sum(t.numel() * t.element_size() for slots in ck.optim["state"].values()
               for t in slots.values() if isinstance(t, torch.Tensor))


def peak_tensor_bytes(cfg: Config) -> tuple[int, str]:
    from nanoft.tools.memory.command import measure

    got = measure(dataclasses.replace(cfg, init_from="scratch"), steps=1)
    return got["total"], got["how"]


def main(argv: list[str]) -> None:
    skip_train = "--skip-train" in argv
    overrides = [a for a in argv if a != "--skip-train"]
    parse_overrides(overrides)  # fail now on a bad key, not after the first run
    rows, base, how = [], None, ""
    for kind in KINDS:
        out_dir = f"out/cmp_{kind}"
        wall, rss = (None, None) if skip_train else train(kind, out_dir, overrides)
        model, cfg, ck = load_run(str(ROOT / out_dir))
        _, val = load_sft_splits(cfg)
        if base is None:  # every config fine-tunes the same base: score it once
            base_model = load_pretrained(dataclasses.replace(cfg, finetune="none", dropout=0.0), ck.base_from)
            base = {"answers": score_answers(base_model, val, "cpu"), "rank": score_speaker_task(base_model, val, "cpu"),
                    "majority": majority_baseline(val[:SCORED_EXAMPLES])}
        trainable, total = count_params(model)
        trainable = sum(t.numel() for t in ck.train_only.values()) or trainable  # prefix tuning: the MLP trained
        peak, how = peak_tensor_bytes(load_config(str(ROOT / f"configs/{kind}.py"), overrides))
        metrics = [json.loads(line) for line in (ROOT / out_dir / "metrics.jsonl").read_text().splitlines()]
        rows.append({"run": kind, "optimizer": cfg.optimizer, "trainable": trainable, "total": total,
                     "optim_state_bytes": optimizer_state_bytes(ck), "peak_tensor_bytes": peak, "peak_rss_bytes": rss,
                     "wall_s": wall, "val_loss": [m["val_loss"] for m in metrics if "val_loss" in m][-1],
                     **{f"answers_{k}": v for k, v in score_answers(model, val, "cpu").items()},
                     "rank_acc": score_speaker_task(model, val, "cpu"), "steps": ck.step})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nbase {ck.base_from}: answers {base['answers']['valid']:.1%} valid, {base['answers']['exact']:.1%} right;"
          f" rank acc {base['rank']:.3f}; majority baseline {base['majority']:.3f}"
          f" (val split, {min(SCORED_EXAMPLES, len(val))} examples, {len({e.response for e in val})} speakers)")
    print(f"peak tensors: {how}; peak RSS: ru_maxrss of each train.py process\n")
    head = f"{'run':<7} {'optimizer':<16} {'trainable params':>24} {'optim state':>12} {'peak tensors':>13} " \
           f"{'peak RSS':>10} {'wall':>7} {'val loss':>8} {'valid':>6} {'right':>6} {'rank acc':>8}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        frac = f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%)"
        rss = fmt_bytes(r["peak_rss_bytes"]) if r["peak_rss_bytes"] else "-"
        wall = f"{r['wall_s']:.0f} s" if r["wall_s"] else "-"
        print(f"{r['run']:<7} {r['optimizer']:<16} {frac:>24} {fmt_bytes(r['optim_state_bytes']):>12} "
              f"{fmt_bytes(r['peak_tensor_bytes']):>13} {rss:>10} {wall:>7} {r['val_loss']:>8.3f} "
              f"{r['answers_valid']:>6.1%} {r['answers_exact']:>6.1%} {r['rank_acc']:>8.3f}")
    lora, qlora = (next(r for r in rows if r["run"] == k) for k in ("lora", "qlora"))
    print(f"\nQLoRA - LoRA: val loss {qlora['val_loss'] - lora['val_loss']:+.3f}, valid answers "
          f"{100 * (qlora['answers_valid'] - lora['answers_valid']):+.1f} points, right answers "
          f"{100 * (qlora['answers_exact'] - lora['answers_exact']):+.1f} points, rank acc {qlora['rank_acc'] - lora['rank_acc']:+.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
