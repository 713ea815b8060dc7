"""The multi-process learner: FSDP2 over 2 gloo processes on this CPU (torchrun) gives the same
update as one process, saves checkpoints any process count can resume, keeps fp32 LoRA beside a
bf16 base; micro-batch planning by hand; token-budget micro-batches and gradient checkpointing
leave the update unchanged; a failing worker is reported."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from srpo_core.config import load_config
from srpo_core.distributed import learn
from srpo_core.learner import Learner, TrainSequence, plan_micro_batches


def _sequences(n: int = 20, seed: int = 0) -> list[TrainSequence]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(3, 40) for _ in range(rng.randrange(4, 9))]
        r = [rng.randrange(3, 40) for _ in range(rng.randrange(3, 15))]
        pre = rng.randrange(0, 2)
        out.append(TrainSequence(p, r, pre, rng.choice([1.0, -0.5, 0.0, 0.7]), [-rng.random() for _ in range(len(r) - pre)], i // 5))
    return out


def _cfg(model_path, **kw):
    return load_config("tiny", {"model.name_or_path": model_path, "train.micro_batch_sequences": 3, "optim.lr": 1e-2, **kw})


def _adapter(path):
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def _delta(after: dict, before: dict) -> torch.Tensor:
    return torch.cat([(after[k].float() - before.get(k, torch.zeros_like(after[k])).float()).flatten() for k in sorted(after)])


# ---- micro-batch planning (hand-computed) ------------------------------------------------------


def test_plan_deals_longest_first_with_equal_counts():
    # lengths by index: 0:5 1:9 2:3 3:7 -> order 1, 3, 0, 2; pairs [1, 3], [0, 2]
    assert plan_micro_batches([5, 9, 3, 7], 1, 2) == [[[1, 3], [0, 2]]]
    assert plan_micro_batches([5, 9, 3, 7], 2, 2) == [[[1, 3]], [[0, 2]]]
    # a 14-token budget: [1] alone (2 x 9 > 14), [3, 0] (2 x 7 = 14), [2]; dealt 0, 1, 0 -> rank 1 pads
    assert plan_micro_batches([5, 9, 3, 7], 2, 4, 14) == [[[1], [2]], [[3, 0], []]]
    # a sequence longer than the budget still goes (alone); more processes than work: empty slots
    assert plan_micro_batches([50, 2], 3, 4, 10) == [[[0]], [[1]], [[]]]
    assert plan_micro_batches([], 2, 4) == [[], []]


@pytest.mark.parametrize("world,max_seqs,max_tokens", [(1, 3, 0), (2, 3, 0), (3, 2, 40), (4, 8, 25)])
def test_plan_covers_every_sequence_once_within_budget(world, max_seqs, max_tokens):
    lengths = [random.Random(world).randrange(1, 30) for _ in range(37)]
    plan = plan_micro_batches(lengths, world, max_seqs, max_tokens)
    assert len(plan) == world and len({len(p) for p in plan}) == 1
    flat = sorted(i for p in plan for micro in p for i in micro)
    assert flat == list(range(len(lengths)))
    for micro in (m for p in plan for m in p if m):
        assert len(micro) <= max_seqs
        if max_tokens and len(micro) > 1:
            assert max(lengths[i] for i in micro) * len(micro) <= max_tokens


# ---- in-process equivalences -------------------------------------------------------------------


def _one_update(cfg, seqs, **kw):
    """The LoRA change of one update under plain SGD (lr 1): minus the clipped gradient, which
    unlike Adam's first step keeps the gradient's scale."""
    torch.manual_seed(0)
    learner = Learner(cfg.model.name_or_path, cfg.lora, cfg.optim, dtype=cfg.model.dtype, temperature=cfg.rollout.temperature, gradient_checkpointing=kw.pop("gradient_checkpointing", False))
    learner.optimizer = torch.optim.SGD([p for p in learner.model.parameters() if p.requires_grad], lr=1.0)
    before = learner.lora_state()
    metrics = learner.update(seqs, cfg.train.mini_batch_prompts, **kw)
    return _delta(learner.lora_state(), before), metrics


def test_update_is_the_gradient_of_the_loss_written_out(tiny_model_path):
    """Against eq. 4.3 computed one sequence at a time with full logits, no masks and no padding:
    L = -(1/N) sum_i A_i * mean over trained tokens of log pi (N: the mini-batch's sequences)."""
    cfg, seqs = _cfg(tiny_model_path, **{"optim.grad_clip": 1e9, "optim.weight_decay": 0.0}), _sequences()
    delta, _ = _one_update(cfg, seqs, micro_batch_sequences=3)  # SGD lr 1, no clipping: -gradient
    torch.manual_seed(0)
    learner = Learner(cfg.model.name_or_path, cfg.lora, cfg.optim, dtype=cfg.model.dtype)
    loss = 0.0
    for s in seqs:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logp = torch.log_softmax(learner.model(input_ids=ids).logits[0].float() / cfg.rollout.temperature, -1)
        trained = range(len(s.prompt_ids) + s.prefix_len, len(s.prompt_ids) + len(s.response_ids))
        loss = loss - s.advantage * torch.stack([logp[t - 1, ids[0, t]] for t in trained]).mean() / len(seqs)
    loss.backward()
    grads = {n: p.grad for n, p in learner.model.named_parameters() if p.requires_grad}
    expected = -torch.cat([grads[k].flatten() for k in sorted(grads)])
    assert expected.abs().max() > 1e-2
    assert (delta - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_token_budget_and_checkpointing_leave_the_update_unchanged(tiny_model_path):
    cfg, seqs = _cfg(tiny_model_path), _sequences()
    ref, m_ref = _one_update(cfg, seqs, micro_batch_sequences=64)
    small, m_small = _one_update(cfg, seqs, micro_batch_sequences=64, micro_batch_tokens=40)
    ckpt, _ = _one_update(cfg, seqs, micro_batch_sequences=3, gradient_checkpointing=True)
    assert m_ref["learner/micro_batches"] == 1 and m_small["learner/micro_batches"] > 4
    assert m_small["learner/active_tokens"] == m_ref["learner/active_tokens"]
    assert ref.abs().max() > 1e-2  # the step moved the adapter
    assert (small - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (ckpt - ref).abs().max() <= 1e-5 * ref.abs().max()


# ---- two processes under torchrun ---------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tiny_model_path, tmp_path_factory):
    """step 1 with 1 and 2 processes; step 2 from the 2-process checkpoint with 2 and with 1."""
    root = tmp_path_factory.mktemp("dist")
    seqs, seqs2 = _sequences(), _sequences(seed=1)
    one, two = _cfg(tiny_model_path), _cfg(tiny_model_path, **{"train.processes": 2})
    m = {
        "1": learn(one, seqs, None, root / "1", 0, canary_path=root / "c1.json"),
        "2": learn(two, seqs, None, root / "2", 0, canary_path=root / "c2.json"),
        "22": learn(two, seqs2, root / "2", root / "22", 1),
        "21": learn(one, seqs2, root / "2", root / "21", 1),
    }
    return root, m


def test_two_fsdp_processes_match_one(runs):
    root, m = runs
    assert m["1"]["learner/processes"] == 1 and m["2"]["learner/processes"] == 2
    assert 0.1 < m["2"]["learner/peak_rss_gb"] < 8  # a torch process with the tiny model, per process
    for key in ("learner/loss", "learner/grad_norm"):
        assert m["2"][key] == pytest.approx(m["1"][key], rel=1e-5)
    for key in ("learner/active_tokens", "learner/micro_batches", "learner/optimizer_steps"):
        assert m["2"][key] == m["1"][key]
    a, b = _adapter(root / "1"), _adapter(root / "2")
    assert a.keys() == b.keys() and len(a) == 28  # 2 layers x 7 modules x (A, B)
    da, db = _delta(a, {}), _delta(b, {})
    assert (da - db).abs().max() <= 1e-4 * da.abs().max()
    oa, ob = torch.load(root / "1" / "optimizer.pt"), torch.load(root / "2" / "optimizer.pt")
    assert oa["optimizer"]["state"].keys() == ob["optimizer"]["state"].keys()
    for k, v in oa["optimizer"]["state"].items():
        assert torch.allclose(v["exp_avg"], ob["optimizer"]["state"][k]["exp_avg"], atol=1e-7, rtol=1e-4)
    ca, cb = (json.loads((root / f"c{i}.json").read_text()) for i in (1, 2))
    assert ca["response_ids"] == cb["response_ids"] and ca["dtype"] == cb["dtype"] == "float32"
    assert max(abs(x - y) for x, y in zip(ca["logprobs"], cb["logprobs"])) <= 1e-4


def test_a_checkpoint_resumes_with_another_process_count(runs):
    root, m = runs
    assert m["22"]["learner/processes"] == 2 and m["21"]["learner/processes"] == 1
    o22, o21 = torch.load(root / "22" / "optimizer.pt"), torch.load(root / "21" / "optimizer.pt")
    assert o22["optimizer_steps"] == o21["optimizer_steps"] == 2  # the optimizer continued
    step2 = _delta(_adapter(root / "22"), _adapter(root / "2"))
    assert step2.abs().max() > 1e-3
    assert (_delta(_adapter(root / "21"), _adapter(root / "2")) - step2).abs().max() <= 1e-4 * step2.abs().max()


def test_bf16_base_with_fp32_lora_under_fsdp(tiny_model_path, tmp_path):
    """The paper preset's shape: bf16 base, peft's fp32 LoRA, FSDP2 all-gathers in bf16."""
    seqs = _sequences()
    kw = {"model.dtype": "bfloat16", "train.gradient_checkpointing": True}
    learn(_cfg(tiny_model_path, **kw), seqs, None, tmp_path / "1", 0)
    learn(_cfg(tiny_model_path, **kw, **{"train.processes": 2}), seqs, None, tmp_path / "2", 0)
    a, b = _adapter(tmp_path / "1"), _adapter(tmp_path / "2")
    assert {v.dtype for v in b.values()} == {torch.float32}
    da, db = _delta(a, {}), _delta(b, {})
    assert torch.nn.functional.cosine_similarity(da, db, dim=0) > 0.999


def test_a_failing_worker_is_reported(tiny_model_path, tmp_path, capfd):
    cfg = _cfg(tiny_model_path, **{"train.processes": 2})
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint/adapter/adapter_config.json"):
        learn(cfg, _sequences(), tmp_path / "no-such-checkpoint", tmp_path / "out", 0)  # before any launch
    broken = tmp_path / "broken"
    (broken / "adapter").mkdir(parents=True)
    (broken / "adapter" / "adapter_config.json").write_text("{}")
    (broken / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="torchrun with 2 processes"):
        learn(cfg, _sequences(), broken, tmp_path / "out", 0)
    err = capfd.readouterr().err
    assert "Root Cause" in err and "in update_and_save" in err  # the worker's own traceback, in torchrun's summary


def test_a_killed_learner_step_leaves_no_processes(tiny_model_path, tmp_path):
    """kill -9 of the step process while torchrun's workers train: agent and workers go too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\nfrom pathlib import Path\nfrom srpo_core.config import load_config\nfrom srpo_core.distributed import learn\n"
        "from tests.test_distributed import _sequences\n"
        f"cfg = load_config('tiny', {{'model.name_or_path': {tiny_model_path!r}, 'train.processes': 2, 'train.update_epochs': 10000}})\n"
        f"learn(cfg, _sequences(), None, Path({str(tmp_path / 'out')!r}), 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(driver)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the agent and both workers are up and training
            family = psutil.Process(proc.pid).children(recursive=True)
            if sum("srpo_core.distributed" in " ".join(c.cmdline()) for c in family if c.is_running()) >= 3:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the torchrun workers did not start: {[c.cmdline() for c in family]}")
        time.sleep(2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        gone, alive = psutil.wait_procs(family, timeout=60)
        assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"
    finally:
        for c in [*family, proc]:
            try:
                c.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass


def test_more_processes_than_gpus_is_refused(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="train.processes=3: 3 learner processes but 2 visible GPUs"):
        learn(_cfg(tiny_model_path, **{"train.processes": 3}), _sequences(), None, tmp_path / "out", 0)
