"""Checkpoints round-trip exactly, and damage or mismatch is a clear error, never a partial load."""
import json

import pytest
import torch

from nanoft.config import Config
from nanoft.model.gpt import GPT
from nanoft.run import checkpoint
from nanoft.run.checkpoint import Checkpoint, CheckpointError

CFG = Config(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128)


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, CFG.vocab_size, (2, 16))
    model(x, x).backward()
    opt.step()
    return model, opt


def _save(path, model, opt, step=3):
    return checkpoint.save(path, Checkpoint(step=step, config=CFG.to_dict(), model=model.state_dict(),
                                            optim=opt.state_dict(), rng=checkpoint.rng_state(), data={"train": {"position": 5}}))


def test_round_trip_is_exact_and_keeps_the_tied_head(tmp_path):
    model, opt = _trained()
    rng_at_save = torch.get_rng_state()
    _save(tmp_path, model, opt)
    ckpt = checkpoint.load(tmp_path)
    fresh = GPT(CFG)
    checkpoint.load_weights(fresh, ckpt.model, str(tmp_path))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh.lm_head.weight is fresh.wte.weight
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt.optim)
    for p1, p2 in zip(model.parameters(), fresh.parameters()):
        assert all(torch.equal(opt.state[p1][k], opt2.state[p2][k]) for k in opt.state[p1])
    assert ckpt.step == 3 and ckpt.data == {"train": {"position": 5}}
    assert torch.equal(ckpt.rng["torch_cpu"], rng_at_save)


def test_a_new_save_replaces_the_old_files(tmp_path):
    model, opt = _trained()
    _save(tmp_path, model, opt, step=1)
    _save(tmp_path, model, opt, step=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0].startswith("ckpt-000002-") and names[1] == "ckpt.json"
    assert checkpoint.load(tmp_path).step == 2


def test_corrupt_tensor_file_is_detected(tmp_path):
    model, opt = _trained()
    _save(tmp_path, model, opt)
    tensors = next(tmp_path.glob("ckpt-*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt checkpoint.*sha256"):
        checkpoint.load(tmp_path)


def test_corrupt_or_missing_metadata_is_detected(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path)
    model, opt = _trained()
    _save(tmp_path, model, opt)
    meta = tmp_path / "ckpt.json"
    meta.write_text(meta.read_text()[:50])
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        checkpoint.load(tmp_path)
    meta.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="is not a nanoft-checkpoint"):
        checkpoint.load(tmp_path)


def test_mismatched_model_is_refused_without_partial_load(tmp_path):
    model, opt = _trained()
    _save(tmp_path, model, opt)
    ckpt = checkpoint.load(tmp_path)
    other_cfg = Config(**{**CFG.to_dict(), "n_embd": 64})
    with pytest.raises(CheckpointError, match="n_embd=32 but the config has n_embd=64"):
        checkpoint.check_compatible(ckpt.config, other_cfg.to_dict(), str(tmp_path), checkpoint.SHAPE_KEYS)
    other = GPT(other_cfg)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.load_weights(other, ckpt.model, str(tmp_path))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched
    del ckpt.model["blocks.1.ln_2.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.ln_2.weight'\]"):
        checkpoint.load_weights(GPT(CFG), ckpt.model, str(tmp_path))


def test_cuda_rng_states_are_restored_by_device_number(monkeypatch):
    """Eleven GPUs' states, saved as torch_cuda_0..10: device 2 must get torch_cuda_2, not torch_cuda_10
    (a string sort puts "10" before "2")."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    state = {"torch_cpu": torch.get_rng_state()}
    state.update({f"torch_cuda_{i}": torch.full((4,), i, dtype=torch.uint8) for i in range(11)})
    checkpoint.set_rng_state(state)
    assert [int(s[0]) for s in restored] == list(range(11))


def _cpu_states(n: int) -> list[dict]:
    """n different CPU generator states, as n ranks would save them."""
    states = []
    for r in range(n):
        torch.manual_seed(100 + r)
        states.append({"torch_cpu": torch.get_rng_state()})
    return states


def test_each_rank_continues_its_own_rng_when_the_world_size_is_the_same():
    saved = checkpoint.per_rank(_cpu_states(2))
    assert sorted(saved) == ["rank0.torch_cpu", "rank1.torch_cpu"]
    assert checkpoint.set_own_rng_state(saved, rank=1, world_size=2, device="cpu") == 2
    assert torch.equal(torch.get_rng_state(), saved["rank1.torch_cpu"])


def test_another_world_size_continues_the_ranks_it_has_and_leaves_the_others():
    saved = checkpoint.per_rank(_cpu_states(2))
    assert checkpoint.set_own_rng_state(saved, rank=0, world_size=1, device="cpu") == 2  # 2 ranks -> 1 process
    assert torch.equal(torch.get_rng_state(), saved["rank0.torch_cpu"])
    single = {"torch_cpu": _cpu_states(1)[0]["torch_cpu"]}
    torch.manual_seed(7)
    own = torch.get_rng_state()
    assert checkpoint.set_own_rng_state(single, rank=1, world_size=2, device="cpu") == 1  # 1 process -> rank 1
    assert torch.equal(torch.get_rng_state(), own)  # rank 1 keeps its seed + rank stream
    assert checkpoint.set_own_rng_state(single, rank=0, world_size=2, device="cpu") == 1
    assert torch.equal(torch.get_rng_state(), single["torch_cpu"])


def test_a_rank_restores_only_its_own_cuda_device(monkeypatch):
    """A rank saved one CUDA state, its own device's; it goes back to this rank's device, no other."""
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("set every device's state"))
    states = _cpu_states(2)
    for r, s in enumerate(states):
        s["torch_cuda"] = torch.full((4,), 10 + r, dtype=torch.uint8)
    checkpoint.set_own_rng_state(checkpoint.per_rank(states), rank=1, world_size=2, device="cuda:1")
    assert restored == [(11, "cuda:1")]
    single = {"torch_cpu": states[0]["torch_cpu"], **{f"torch_cuda_{i}": torch.full((4,), i, dtype=torch.uint8) for i in range(3)}}
    restored.clear()
    checkpoint.set_own_rng_state(single, rank=0, world_size=2, device="cuda:0")  # 1 process -> rank 0 of 2
    assert restored == [(0, "cuda:0")]
