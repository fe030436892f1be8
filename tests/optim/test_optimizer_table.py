"""make_optimizer: names, param groups, errors; and each optimizer trains a small GPT."""
import dataclasses
import types

import pytest
import torch

from nanoft.config import Config
from nanoft.model.gpt import GPT
from nanoft.optim import OPTIMIZERS, Adafactor, AdamW8bit, PagedAdamW, PagedAdamW8bit, make_optimizer

SMALL = Config(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=128, dropout=0.0, lr=3e-3,
               weight_decay=0.1, min_8bit_size=1024, page_size=2048)


pytestmark = pytest.mark.usefixtures("one_thread")  # many steps on tiny tensors (tests/conftest.py's fixture)


def test_each_name_selects_its_optimizer():
    model = GPT(SMALL)
    expected = {"adamw": torch.optim.AdamW, "adamw8bit": AdamW8bit, "paged_adamw": PagedAdamW,
                "paged_adamw8bit": PagedAdamW8bit, "adafactor": Adafactor}
    assert set(expected) <= set(OPTIMIZERS)
    assert issubclass(OPTIMIZERS["adamw"], torch.optim.AdamW)  # torch's own update, with the table's facts
    for name, cls in OPTIMIZERS.items():
        opt = make_optimizer(dataclasses.replace(SMALL, optimizer=name), model)
        assert type(opt) is cls and isinstance(opt, expected.get(name, cls))


def test_param_groups_decay_matrices_only_and_skip_frozen():
    model = GPT(SMALL)
    frozen = next(p for p in model.parameters() if p.dim() == 1)
    frozen.requires_grad_(False)
    opt = make_optimizer(SMALL, model)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]  # the tied head/embedding counted once
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert all(p is not frozen for p in no_decay["params"])


def test_unknown_name_lists_the_valid_ones():
    cfg = types.SimpleNamespace(**{**SMALL.to_dict(), "optimizer": "sgd"})  # Config itself rejects it earlier
    with pytest.raises(ValueError, match="adamw, adamw8bit, paged_adamw, paged_adamw8bit, adafactor"):
        make_optimizer(cfg, GPT(SMALL))


def test_adafactor_relative_step_takes_no_lr():
    opt = make_optimizer(dataclasses.replace(SMALL, optimizer="adafactor", adafactor_relative_step=True), GPT(SMALL))
    assert opt.param_groups[0]["lr"] is None and opt.param_groups[0]["relative_step"]
    opt = make_optimizer(dataclasses.replace(SMALL, optimizer="adafactor"), GPT(SMALL))
    assert opt.param_groups[0]["lr"] == SMALL.lr


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_fits_a_batch(name):
    cfg = dataclasses.replace(SMALL, optimizer=name)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = make_optimizer(cfg, model)
    if name == "adafactor":  # an external lr must be larger when it is scaled by the weights' RMS (~0.02)
        for group in opt.param_groups:
            group["scale_parameter"] = False
    x = torch.randint(0, cfg.vocab_size, (4, cfg.block_size + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    losses = []
    for _ in range(25):
        loss = model(inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
