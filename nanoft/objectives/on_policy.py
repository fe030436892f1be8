"""What PPO and GRPO share: a rollout made inside the objective, then reused for several epochs of minibatches.

train.py's step stays `loss = objective(model, batch)` -> backward -> optimizer step. The batch is preference
pairs (nanoft/data/preferences.py); only their prompts are used. When the objective has no rollout left it makes
one from the batch it was given: cfg.rl_samples responses to each of its cfg.batch_size prompts, sampled from the
current policy (nanoft/objectives/rollout.py), scored by the reward model (cfg.reward_from, frozen), with the
log-probabilities the policy (pi_old) and the reference (pi_ref) gave every response token, under no_grad. That
rollout then serves

    rl_epochs passes x rl_minibatches minibatches    (each minibatch: grad_accum micro-batches, one per call)

so one rollout feeds rl_epochs * rl_minibatches optimizer steps, and the batches train.py draws meanwhile are
not used (their prompts are skipped; the data position still advances, so resuming stays exact). The first
pass takes the rows in order, in the very chunks pi_old was computed in, so its first ratio pi / pi_old is
exactly 1; later passes shuffle the rows (the global RNG, which checkpoints save). With several updates per
rollout the ratio moves away from 1 and the clip acts; with one, PPO is plain policy gradient.

A minibatch's loss is the sum of its tokens' losses over the minibatch's response tokens (every micro-batch of
a step divides by the same count), so a step's gradient is the token mean over the minibatch.

The reference is the starting policy (nanoft/objectives/dpo.py's FrozenReference): LoRA/QLoRA switch their
adapters off, full weights keep a frozen copy. Dropout must be 0 (method_of checks): pi_old, the first
pass's pi and pi_ref then agree exactly at the start, and the ratio measures the update alone.

Resume: the rollout in progress is not saved (a resumed run starts a new one); the step, the RNG, the data
position, the weights (the value head included) and the adaptive KL coefficient are (`state_dict`, read back
from ckpt.json when init_from=resume).

Validation (`eval_loss`): the negated mean reward-model score of greedy responses to the val prompts
(deterministic), so best/ keeps the weights whose greedy answers score highest. `report`: the held-out
table of nanoft/objectives/rl_eval.py, reference before -> policy after.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from nanoft.config import Config
from nanoft.data.preferences import PreferencePair, fitting, load_preference_splits
from nanoft.objectives.base import Objective, check_single_process
from nanoft.objectives.dpo import FrozenReference
from nanoft.objectives.reward import load_reward_model
from nanoft.objectives.rl_eval import evaluate, pair_prompts
from nanoft.objectives.rl_math import KL_ESTIMATORS, kl_k1
from nanoft.objectives.rollout import as_rows, prompts_of, response_logprobs, reward_scores, sample, stop_ids
from nanoft.run import checkpoint

NORM_PROMPTS = 64  # reward_norm: the reference answers this many training prompts, twice each, to set mean and std


class Rollout:
    """One rollout's tensors, (R, T) each unless said: x, y, mask (the response's targets), old_logp, ref_logp,
    scores (R,), and whatever the method adds (values, advantages, returns)."""

    def __init__(self, **tensors: Tensor):
        self.__dict__.update(tensors)


class OnPolicy(Objective):
    frozen_models = ("reference", "reward")  # the starting policy (full weights: a copy) and the reward model
    uses_values = False  # PPO: a value head reads the policy's hidden states

    def __init__(self, cfg: Config, model: nn.Module, device: str | torch.device):
        super().__init__()
        check_single_process(cfg.finetune)
        self.cfg, self.device = cfg, device
        self.reference = FrozenReference(model, device)  # before any head is added: the policy as it starts
        self.reward_model = load_reward_model(cfg.reward_from, device)
        if self.reward_model.block_size < cfg.block_size or self.reward_model.cfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"reward model {cfg.reward_from} reads {self.reward_model.block_size} tokens of a "
                             f"{self.reward_model.cfg.vocab_size}-token vocabulary; the policy needs block_size >= "
                             f"{cfg.block_size} and vocab_size {cfg.vocab_size}")
        self.stop = stop_ids(cfg.rl_stop)
        self.kl_coef = cfg.kl_coef
        if cfg.init_from == "resume":  # the controller's coefficient goes on where it was
            self.load_state_dict(checkpoint.read_meta(cfg.out_dir)["extra"])
        self._queue: list[tuple[Tensor, float]] = []  # (rows, loss scale) per call left in this rollout
        self._rollout: Rollout | None = None
        self._rollout_scores: dict[str, Tensor] = {}
        self._norm: tuple[float, float] | None = None  # reward_norm: the reference's (mean, std)

    def state_dict(self) -> dict:
        """What a checkpoint's extra keeps for resuming (JSON)."""
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, extra: dict) -> None:
        self.kl_coef = float(extra.get("kl_coef", self.kl_coef))

    # --- the rollout ---------------------------------------------------------------------------------------

    def _plan(self, n_rows: int, mask: Tensor) -> list[tuple[Tensor, float]]:
        """(rows, scale) for every call this rollout serves: epochs x minibatches x grad_accum chunks. scale =
        grad_accum / (the minibatch's response tokens): train.py divides each call's loss by grad_accum."""
        cfg, plan = self.cfg, []
        tokens = mask.sum(dim=1).cpu()
        for epoch in range(cfg.rl_epochs):
            order = torch.arange(n_rows) if epoch == 0 else torch.randperm(n_rows)
            for minibatch in torch.tensor_split(order, cfg.rl_minibatches):
                scale = cfg.grad_accum / tokens[minibatch].sum().item()
                plan += [(rows, scale) for rows in torch.tensor_split(minibatch, cfg.grad_accum)]
        return plan

    @torch.no_grad()
    def _sample_and_score(self, model: nn.Module, prompts: list[list[int]], n: int, temperature: float,
                          generator: torch.Generator | None = None):
        responses, stopped = sample(model, prompts, n, temperature, self.cfg.rl_max_new_tokens, self.stop, generator)
        scores = reward_scores(self.reward_model, prompts, responses, n)
        return responses, torch.tensor(stopped, device=scores.device), scores

    def _normalisation(self, model: nn.Module) -> tuple[float, float]:
        """reward_norm: the mean and std of the score of the reference's samples on the first NORM_PROMPTS
        training prompts, drawn with a fixed seed, so a resumed run computes the same two numbers."""
        if self._norm is None:
            pairs = fitting(load_preference_splits(self.cfg)[0][:NORM_PROMPTS], self.cfg.block_size)
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
            with self.reference.as_model(model) as reference:
                _, _, scores = self._sample_and_score(reference, pair_prompts(pairs, self.cfg.block_size), 2,
                                                      self.cfg.rl_temperature, gen)
            self._norm = (scores.mean().item(), scores.std().item())
        return self._norm

    @torch.no_grad()
    def make_rollout(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Rollout:
        cfg = self.cfg
        x, _, mask = batch
        half = x.size(0) // 2  # preference rows: B chosen, then the same B prompts' rejected
        prompts = prompts_of(x[:half], mask[:half])
        was_training = model.training
        model.eval()
        try:
            responses, stopped, raw = self._sample_and_score(model, prompts, cfg.rl_samples, cfg.rl_temperature)
            scores = raw
            if cfg.reward_norm:
                mean, std = self._normalisation(model)
                scores = (raw - mean) / (std + 1e-8)
            scores = scores - cfg.rl_no_stop_penalty * (~stopped).float()  # never stopped: penalised
            x, y, mask = as_rows(prompts, responses, cfg.rl_samples, cfg.block_size, x.device)
            self._queue = self._plan(x.size(0), mask)
            chunks = [rows for rows, _ in self._queue[:cfg.rl_minibatches * cfg.grad_accum]]  # the first pass's
            head = model.value_head if self.uses_values else None
            old = [response_logprobs(model, x[r], y[r], mask[r], cfg.rl_temperature, head) for r in chunks]
            with self.reference.as_model(model) as reference:
                ref = [response_logprobs(reference, x[r], y[r], mask[r], cfg.rl_temperature)[0] for r in chunks]
        finally:
            model.train(was_training)
        old_logp, ref_logp = torch.cat([lp for lp, _ in old]), torch.cat(ref)  # the first pass is in row order
        rollout = Rollout(x=x, y=y, mask=mask.float(), old_logp=old_logp, ref_logp=ref_logp, scores=scores)
        if self.uses_values:
            rollout.values = torch.cat([v for _, v in old])
        kl = (kl_k1(old_logp, ref_logp) * rollout.mask).sum(dim=1)  # (R,) log pi(y|x) - log pi_ref(y|x)
        self._rollout_scores = {"score": raw.mean(), "kl": kl.mean(), "stopped": stopped.float().mean(),
                                "response_tokens": rollout.mask.sum(dim=1).mean()}
        return rollout

    # --- the step --------------------------------------------------------------------------------------------

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        if not self._queue:
            self._rollout = self.prepare(self.make_rollout(model, batch))
        rows, scale = self._queue.pop(0)
        loss, scores = self.loss(model, self._rollout, rows.to(self._rollout.x.device), scale)
        self.add_scores(**scores, **self._rollout_scores)
        return loss

    def prepare(self, rollout: Rollout) -> Rollout:
        """The method's advantages (and returns), once per rollout."""
        raise NotImplementedError

    def loss(self, model: nn.Module, rollout: Rollout, rows: Tensor, scale: float) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def kl_per_token(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        return KL_ESTIMATORS[self.cfg.kl_estimator](logp, ref_logp)

    # --- evaluation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """-(mean reward-model score of the greedy responses to the batch's prompts), logged with their KL."""
        x, _, mask = batch
        half = x.size(0) // 2
        prompts = prompts_of(x[:half], mask[:half])
        responses, stopped, scores = self._sample_and_score(model, prompts, 1, 0.0)
        xr, yr, mr = as_rows(prompts, responses, 1, self.cfg.block_size, x.device)
        logp, _ = response_logprobs(model, xr, yr, mr, self.cfg.rl_temperature)
        with self.reference.as_model(model) as reference:
            ref_logp, _ = response_logprobs(reference, xr, yr, mr, self.cfg.rl_temperature)
        self.add_scores(greedy_score=scores.mean(), greedy_kl=((logp - ref_logp) * mr).sum(dim=1).mean(),
                        greedy_stopped=stopped.float().mean())
        return -scores.mean()

    def report(self, model: nn.Module, val_pairs: list[PreferencePair], device, autocast, cfg, sharded: bool) -> str:
        with autocast:
            return evaluate(model, lambda: self.reference.as_model(model), self.reward_model, val_pairs, cfg).table()

