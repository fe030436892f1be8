"""What a run learns: one table from the config's `finetune` name to its method.

A method is an objective (the loss train.py minimises, nanoft/objectives/*.py), the data it reads, and which
weights train. Every place that needs to know something about a method asks its entry here:

    finetune   objective        data          weights that train
    none       NextTokenLoss    tokens        full        pretraining
    full       NextTokenLoss    sft           full        supervised fine-tuning, every weight
    lora       NextTokenLoss    sft           lora        low-rank adapters beside a frozen base (nanoft/peft)
    qlora      NextTokenLoss    sft           qlora       the same over an NF4 base
    prefix     NextTokenLoss    sft           prefix      trained key/value prefixes
    adapter    NextTokenLoss    sft           adapter     Houlsby bottleneck layers
    dpo        DPO              preferences   choice      finetune_weights: full, lora or qlora
    reward     RewardModel      preferences   full        a Bradley-Terry reward head
    distill    Distillation     tokens        full        a frozen teacher's softmax
    ppo        PPO              preferences   choice      RLHF against a reward model: rollouts, value head, GAE
    grpo       GRPO             preferences   choice      the same ratio, advantages relative to a group of samples

data: "tokens" (token files, nanoft.data.tokens), "sft" (prompt/response pairs, nanoft.data.sft), "preferences"
(prompt/chosen/rejected, nanoft.data.preferences; PPO and GRPO use only the prompts).
"""
from __future__ import annotations

from dataclasses import dataclass

from nanoft.config import Config, ConfigError
from nanoft.objectives.base import NextTokenLoss, Objective
from nanoft.objectives.distill import Distillation
from nanoft.objectives.dpo import DPO
from nanoft.objectives.grpo import GRPO
from nanoft.objectives.on_policy import OnPolicy
from nanoft.objectives.ppo import PPO
from nanoft.objectives.reward import RewardModel
from nanoft.peft.methods import PEFT

WEIGHT_CHOICES = ("full", "lora", "qlora")  # what finetune_weights may name where a method lets it choose


@dataclass(frozen=True)
class Method:
    objective: type[Objective]  # the loss: objective(cfg, model, device)(model, batch) -> a scalar
    data: str  # what it reads: "tokens", "sft" or "preferences"
    weights: str  # which weights train: "full", "lora", "qlora", "prefix", "adapter"; "choice": cfg.finetune_weights

    def trains(self, cfg: Config) -> str:
        """Which weights this run trains: "full", "lora", "qlora", "prefix" or "adapter"."""
        return cfg.finetune_weights if self.weights == "choice" else self.weights

    def peft(self, cfg: Config) -> type | None:
        """The parameter-efficient method this run installs (an entry of nanoft.peft.methods.PEFT), or None when
        every weight trains."""
        return PEFT.get(self.trains(cfg))

    @property
    def one_process(self) -> bool:
        """Objectives that run their own forward (model.hidden_states) bypass DDP's hooks: python train.py only."""
        return self.objective is not NextTokenLoss

    def shards(self, cfg: Config) -> bool:
        """Whether FSDP2 can shard this run: the plain loss over full, LoRA or QLoRA weights (prefix tuning and
        adapter layers train with DDP)."""
        return not self.one_process and self.trains(cfg) in WEIGHT_CHOICES

    def compile_measured(self, cfg: Config) -> bool:
        """Whether "auto" compile's break-even was measured for this run's graph: the plain loss, every weight."""
        return not self.one_process and self.trains(cfg) == "full"


METHODS: dict[str, Method] = {
    "none": Method(NextTokenLoss, "tokens", "full"),
    "full": Method(NextTokenLoss, "sft", "full"),
    "lora": Method(NextTokenLoss, "sft", "lora"),
    "qlora": Method(NextTokenLoss, "sft", "qlora"),
    "prefix": Method(NextTokenLoss, "sft", "prefix"),
    "adapter": Method(NextTokenLoss, "sft", "adapter"),
    "dpo": Method(DPO, "preferences", "choice"),
    "reward": Method(RewardModel, "preferences", "full"),
    "distill": Method(Distillation, "tokens", "full"),
    "ppo": Method(PPO, "preferences", "choice"),
    "grpo": Method(GRPO, "preferences", "choice"),
}


def method_of(cfg: Config) -> Method:
    """cfg's method, its keys checked against it; an unknown name or a key it cannot use is one ConfigError line."""
    if cfg.finetune not in METHODS:
        raise ConfigError(f"config key 'finetune' must be one of {', '.join(METHODS)}; got {cfg.finetune!r}")
    method = METHODS[cfg.finetune]
    if cfg.finetune_weights != "full" and method.weights != "choice":
        raise ConfigError(f"config key 'finetune_weights' must be full unless finetune=dpo, ppo or grpo (the others "
                          f"train full weights); got {cfg.finetune_weights!r}")
    if bool(cfg.teacher_from.strip()) != (method.objective is Distillation):
        raise ConfigError(f"config key 'teacher_from' must be a checkpoint dir with finetune=distill, and empty "
                          f"otherwise; got {cfg.teacher_from!r}")
    if issubclass(method.objective, OnPolicy):
        check_on_policy(cfg)
    elif cfg.reward_from.strip():
        raise ConfigError(f"config key 'reward_from' is for finetune=ppo or grpo; got {cfg.reward_from!r}")
    return method


def check_on_policy(cfg: Config) -> None:
    """PPO and GRPO: a reward model, no dropout (pi_old and the first pass's pi agree exactly), groups to compare,
    and at least one rollout row per micro-batch."""
    if not cfg.reward_from.strip():
        raise ConfigError(f"finetune={cfg.finetune} needs reward_from=DIR, a finetune=reward checkpoint")
    if cfg.dropout or (cfg.lora_kind and cfg.lora_dropout):
        raise ConfigError(f"finetune={cfg.finetune} needs dropout=0 and lora_dropout=0 (the ratio pi / pi_old must "
                          f"start at 1); got dropout={cfg.dropout}, lora_dropout={cfg.lora_dropout}")
    if cfg.finetune == "grpo" and cfg.rl_samples < 2:
        raise ConfigError(f"finetune=grpo compares rl_samples >= 2 responses per prompt; got {cfg.rl_samples}")
    if cfg.batch_size * cfg.rl_samples < cfg.rl_minibatches * cfg.grad_accum:
        raise ConfigError(f"a rollout of batch_size * rl_samples = {cfg.batch_size * cfg.rl_samples} responses cannot "
                          f"fill rl_minibatches * grad_accum = {cfg.rl_minibatches * cfg.grad_accum} micro-batches")
