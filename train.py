"""Train a GPT: pretraining from scratch, or full / LoRA / QLoRA fine-tuning, in one loop.

    python train.py configs/tiny.py                       # CPU, ~5 minutes, Shakespeare
    python train.py configs/100m.py                       # the ~100M-parameter exercise (GPU)
    python train.py configs/tiny.py --init_from=resume    # continue the run in out_dir
    python train.py configs/lora.py                       # LoRA fine-tune of out/tiny on the speaker task
    python train.py configs/tiny.py --optimizer=adamw8bit --max_iters=100 --out_dir=out/try
    torchrun --nproc_per_node=2 train.py configs/tiny.py  # data-parallel (batch_size is per rank)
    torchrun --nproc_per_node=2 train.py configs/tiny.py --fsdp=True  # sharded (FSDP2)
    python train.py configs/100m.py --help                # every config key

Writes out_dir/metrics.jsonl (one JSON object per logged step) and checkpoints (ckpt.json + ckpt-<step>-<sha>
.safetensors; best/ holds the lowest validation loss). Ctrl-C or SIGTERM ends the step, saves it and exits.
"""
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

import torch

from nanoft.config import describe, load_config, parse_overrides
from nanoft.data.batches import make_batches
from nanoft.interop.pretrained import load_pretrained, resolve_base
from nanoft.model import GPT
from nanoft.objectives import METHODS, method_of
from nanoft.optim import OPTIMIZERS, make_optimizer, optimizer_class, warmup_cosine
from nanoft.peft.methods import trainable_summary
from nanoft.run import checkpoint, distributed
from nanoft.run.evaluate import estimate_loss
from nanoft.run.flops import flops_per_token, peak_flops
from nanoft.run.loss_plot import refresh_plot
from nanoft.run.memory_measure import measured_breakdown
from nanoft.run.out_dir import claim
from nanoft.run.precision import pick_compile, pick_device, pick_dtype
from nanoft.run.progress import finite_or_none, progress
from nanoft.run.resume import check_resume, resumed_position
from nanoft.run.sizing import GpuSizedNotice, warmup_notice
from nanoft.run.step_guard import StepGuard
from nanoft.run.stop import StopRequest


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or "--help" in argv:
        print(__doc__ + "\n" + describe() + f"\n\noptimizers: {', '.join(OPTIMIZERS)}\nmethods (finetune): {', '.join(METHODS)}")
        return
    cfg = load_config(argv[0], argv[1:])
    owner = claim(cfg, argv)  # noqa: F841 (out_dir is ours while it lives; even kill -9 releases it)
    cfg = resolve_base(cfg, parse_overrides(argv[1:]))  # the base's shape: its checkpoint's, or GPT-2's config.json
    method, _ = method_of(cfg), optimizer_class(cfg.optimizer)  # the method's and optimizer's table entries
    peft = method.peft(cfg)  # LoRA, QLoRA, prefix, adapters: the base frozen, a few tensors added; None: all train
    if cfg.fsdp and not method.shards(cfg):
        raise ValueError(f"fsdp=True supports finetune=none, full, lora or qlora, not {cfg.finetune}: "
                         "train it with DDP (fsdp=False)")
    resume = checkpoint.load(cfg.out_dir) if cfg.init_from == "resume" else None
    if resume:  # the shape is the checkpoint's (resolve_base); other keys may change (printed), a few may not
        check_resume(resume, cfg)
    base_from = resume.base_from if resume else cfg.init_from

    device = pick_device(cfg.device)
    dist = distributed.setup(device, cfg)
    device = distributed.device_for(dist, device)
    dtype = pick_dtype(cfg.dtype, device, cfg.n_embd)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = torch.autocast(device_type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    torch.manual_seed(cfg.seed)  # same init on every rank
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls: ~free speed on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True

    # ---- model: base weights, then adapters, then the run's own weights when resuming ----
    model = GPT(cfg) if base_from == "scratch" else load_pretrained(cfg, base_from)
    if peft:
        model = peft.apply(model, cfg, device)  # QLoRA quantizes each layer on the device
        if dist.is_master:
            print(trainable_summary(model))
    # the loss: next-token cross-entropy, or a method's own (its frozen reference, reward head or teacher made here)
    objective = method.objective(cfg, model, device)
    if resume:
        if peft:
            peft.load(model, resume.model, resume.train_only)
        else:
            checkpoint.load_weights(model, resume.model, cfg.out_dir)
    model = distributed.place(model, dist, device, dtype)  # to the device; fsdp: this rank's shard, gathered in dtype
    optimizer = make_optimizer(cfg, model)  # after place(): with fsdp it must hold the sharded parameters
    if resume and resume.optim is not None:
        distributed.load_optimizer_state(optimizer, resume.optim, dist)
    raw_model = model
    model = distributed.wrap(model, dist, device)  # DDP first, then compile: DDP's hooks overlap comm with compute
    if pick_compile(cfg, raw_model, device, method.compile_measured(cfg)):  # "auto": when the run is long enough to repay compiling
        model = torch.compile(model)  # slow first step, faster after
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
    if resume and resume.extra.get("scaler"):  # fp16: the loss scale and its growth count go on where they were
        scaler.load_state_dict(resume.extra["scaler"])
    guard = StepGuard(cfg.max_bad_steps, scaler.is_enabled(), dist)  # skips non-finite steps

    # ---- data: token files for pretraining, prompt/response pairs for fine-tuning ----
    train_batches, val_batches, val_examples = make_batches(cfg, method.data, dist, device)  # which rows, by method
    start_step, best_val = 0, checkpoint.best_val_loss(cfg.out_dir) if resume else float("inf")
    if resume:  # the same data row even if the global batch changed (then converted, and printed)
        train_batches.load_state_dict(resumed_position(resume, cfg, dist.world_size))
        start_step = resume.step
    distributed.seed_ranks(dist, cfg.seed, device, resume.rng if resume else None)  # each rank its own dropout masks

    def save(step: int, where: str | Path = cfg.out_dir, **extra) -> None:
        # full weights (a PEFT method saves only what it trained), optimizer state and every rank's RNG on rank 0
        # (every rank joins the gathers)
        weights, optim_state = distributed.full_state_dict(raw_model, optimizer, dist, weights=not peft)
        rng = distributed.rng_state(dist, device)
        if not dist.is_master:
            return
        train_only = {}  # prefix tuning: its MLP, which only a resumed run needs (the model runs on the folded prefixes)
        if peft:  # only what the method trained goes to disk, with its shape and its base
            (weights, train_only), extra["adapter"] = peft.saved(raw_model), peft.config(cfg, base_from)
        checkpoint.save(where, checkpoint.Checkpoint(
            step=step, config=cfg.to_dict(), model=weights, base_from=base_from, optim=optim_state,
            extra={**extra, "scaler": scaler.state_dict(), **objective.state_dict()},  # fp16's loss scale; PPO's KL coef
            data={"train": train_batches.state_dict(), "world_size": dist.world_size}, rng=rng, train_only=train_only))

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = open(out_dir / "metrics.jsonl", "a") if dist.is_master else None  # noqa: SIM115 (closed after the loop)
    if cfg.wandb_log and dist.is_master:
        import wandb
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=cfg.to_dict(), resume="allow")
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * dist.world_size
    step_flops = flops_per_token(raw_model, cfg.n_layer, cfg.block_size, cfg.n_embd) * tokens_per_step / dist.world_size
    peak, peak_source = peak_flops(device, dtype)  # per device; MFU below is per device too
    sizing = GpuSizedNotice(device, step_flops * (cfg.max_iters - start_step), peak, argv[0])  # a GPU's job on a CPU?
    if dist.is_master:
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters | device {device} {str(dtype).removeprefix('torch.')}"
              f" | {tokens_per_step:,} tokens/step | optimizer {cfg.optimizer} | peak {peak / 1e12:.3g} TFLOP/s ({peak_source})")
        for note in filter(None, (sizing.opening() if sizing.active else None, warmup_notice(cfg))):
            print(note)

    # ---- the loop ----
    # a terminal gets tqdm's bar; a log file or pipe gets a plain line every few seconds (nanoft.run.progress)
    bar = progress(range(start_step, cfg.max_iters), initial=start_step, total=cfg.max_iters, disable=not dist.is_master)
    stop = StopRequest(dist)  # Ctrl-C, SIGTERM: the step ends, is saved, and the run exits with 130, 143
    # throughput: steps between two log points / wall time between them. Both points follow a .item() sync, so
    # on a GPU every queued kernel of those steps is inside the interval (and eval time is left out of it)
    t_log, step_log = time.perf_counter(), start_step
    try:
        for step in bar:
            lr = warmup_cosine(step, warmup_iters=cfg.warmup_iters, max_iters=cfg.max_iters, lr=cfg.lr, min_lr=cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            micro_batches = [train_batches.next() for _ in range(cfg.grad_accum)]
            objective.begin_step(micro_batches)  # SFT: counts the step's response tokens, to weight each micro-batch
            for micro, batch in enumerate(micro_batches):
                with distributed.sync_gradients(model, last_micro_step=micro == cfg.grad_accum - 1), autocast:
                    loss = objective(model, batch)
                    loss = loss / cfg.grad_accum  # the accumulated gradient is the mean over micro-batches
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)  # the true gradients, to measure (and clip) before stepping
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            if guard.ok(loss_sum, grad_norm, step + 1, stop.requested):  # a NaN/inf loss or gradient skips the step
                scaler.step(optimizer)
            scaler.update()  # fp16: lowers the loss scale after an overflow
            optimizer.zero_grad(set_to_none=True)  # free the gradients' memory until the next backward
            done = step + 1
            if sizing.active and dist.is_master and (line := sizing.step_done(done, cfg.max_iters)):  # a GPU's job here
                bar.write(line)
            if done == start_step + 1 and dist.is_master:  # once: now the optimizer states exist (fsdp: rank 0's shards)
                bar.write(measured_breakdown(raw_model, optimizer))
            last = done == cfg.max_iters
            log_now = done % cfg.log_interval == 0 or last or done % cfg.eval_interval == 0
            if log_now:
                loss_value = distributed.mean_across_ranks(loss_sum, dist).item()  # a CPU-GPU sync point
                steps_per_s = (done - step_log) / (time.perf_counter() - t_log)
                record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": guard.grad_norm.item(),  # unclipped
                          "tokens_per_s": tokens_per_step * steps_per_s,
                          "mfu": step_flops * steps_per_s / peak, **objective.pop_scores("train_")}
                if device_type == "cuda":  # the allocator's high-water mark so far (python -m nanoft check compares it)
                    record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                if done % cfg.eval_interval == 0 or last:
                    val = torch.tensor(estimate_loss(objective, model, val_batches, cfg.eval_iters, autocast), device=device)
                    record["val_loss"] = distributed.mean_across_ranks(val, dist).item()
                    record.update(objective.pop_scores("val_"))  # e.g. DPO's reward accuracy on the val pairs
                    if record["val_loss"] < best_val:  # the best weights so far, in out_dir/best beside the latest
                        best_val = record["val_loss"]
                        save(done, Path(cfg.out_dir) / checkpoint.BEST_DIR, val_loss=best_val)
                record["skipped"] = guard.skipped  # steps not applied: non-finite loss or gradient
                if dist.is_master:
                    metrics.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
                    metrics.flush()
                    if cfg.wandb_log:
                        wandb.log(record, step=done)
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    mfu=f"{100 * record['mfu']:.1f}%",
                                    **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
                    if "val_loss" in record:
                        bar.write(f"step {done}: train loss {loss_value:.4f}, val loss {record['val_loss']:.4f}")
                        refresh_plot(out_dir)  # out_dir/loss.png when matplotlib is installed; never fails the run
            if done % cfg.save_interval == 0 or last:
                save(done)
            if log_now:
                t_log, step_log = time.perf_counter(), done  # after eval and save, which are not training time
            if guard.stop and not last:  # a stop signal (on any rank, agreed in guard.ok): the last step, on every rank
                if dist.is_master:
                    bar.write(f"interrupted: saving a checkpoint at step {done} in {cfg.out_dir}")
                if done % cfg.save_interval:  # not saved above
                    save(done)
                sys.exit(stop.exit_code)
    finally:
        stop.close()
        bar.close()
        if metrics:
            metrics.close()

    # ---- show what the model does now: a sample, or the method's held-out scores (fsdp: every rank runs it) ----
    if dist.is_master or dist.fsdp:
        report = objective.report(raw_model, val_examples, device, autocast, cfg, sharded=dist.fsdp)
        if dist.is_master and report:
            print(report)
    if cfg.wandb_log and dist.is_master:
        wandb.finish()


if __name__ == "__main__":
    # Ctrl-C (or kill -INT) saves and exits, even for a run started in the background (`... &`, nohup), which
    # inherits SIGINT as ignored, so Python would not turn it into KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    exit_code = 0
    try:
        main(sys.argv[1:])
    except SystemExit as e:  # a stop signal's 130 or 143
        exit_code = e.code
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
        exit_code = f"error: {e}"  # bad input is one clear line, not a traceback
    # here, after the except blocks, whose traceback kept main()'s model alive: nothing holds the process group now
    distributed.teardown()
    sys.exit(exit_code)
