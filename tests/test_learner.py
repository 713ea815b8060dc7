"""LoRA learner on the tiny model: two srpo steps change the adapter and only the adapter; the
adapter round-trips in PEFT format; a resumed optimizer continues identically."""

import json

import pytest
import torch

from srpo_core.config import load_config
from srpo_core.loop import open_session, train_step


@pytest.fixture(scope="module")
def session(tiny_model_path):
    cfg = load_config("tiny", {"model.name_or_path": tiny_model_path, "method.localizer": "oracle", "train.prompts_per_step": 8, "train.mini_batch_prompts": 4})
    return open_session(cfg)


def test_two_srpo_steps_change_lora_only(session, tmp_path):
    lora0, base0 = session.learner.lora_state(), session.learner.base_state()
    assert lora0 and base0
    items = session.task.items("train", 16, 0)
    metrics = []
    for step in range(2):
        result = train_step(session, items[step * 8 : (step + 1) * 8], step, tmp_path)
        metrics.append(result.metrics)
    assert sum(m["learner/optimizer_steps"] for m in metrics) >= 2
    lora1, base1 = session.learner.lora_state(), session.learner.base_state()
    changed = [k for k in lora0 if not torch.equal(lora0[k], lora1[k])]
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    assert all(torch.equal(base0[k], base1[k]) for k in base0)
    assert all(not p.requires_grad for n, p in session.learner.model.named_parameters() if "lora_" not in n)
    # the records of both steps were written, with the documented fields
    rows = [json.loads(l) for l in (tmp_path / "steps" / "000001" / "rollouts.jsonl").read_text().splitlines()]
    fields = {"step", "prompt_id", "group_id", "group", "split", "localizer", "reset_index", "oracle_first_error", "prefix_tokens", "response_tokens", "thoughts", "reward", "advantage"}
    assert rows and all(fields <= set(r) for r in rows)
    assert {r["group"] for r in rows} <= {"base", "shared_prefix", "fallback", "seed"}
    for r in rows:
        if r["group"] == "shared_prefix":
            assert r["reset_index"] == r["oracle_first_error"] or r["oracle_first_error"] > len(r["thoughts"])
        if r["group"] == "base":
            assert r["reset_index"] is None and r["prefix_tokens"] == 0


def test_adapter_round_trips_in_peft_format(session, tmp_path, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = session.learner.save_adapter(tmp_path / "adapter")
    assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(path)).eval()
    ids = torch.tensor([session.engine.encode("Q:7*3-2-8+1|7*3=1</thought>")])
    with torch.no_grad():
        a = session.learner.model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_zero_advantage_step_leaves_weights(session):
    """A batch whose groups are all flat carries no gradient: nothing moves."""
    from srpo_core.learner import TrainSequence

    before = session.learner.lora_state()
    seqs = [TrainSequence([5, 6, 7], [8, 9], 0, 0.0, [-0.1, -0.2], 0)]
    m = session.learner.update(seqs, 8, 8)
    assert m["learner/optimizer_steps"] == 0.0
    after = session.learner.lora_state()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prefix_tokens_get_no_gradient(session):
    """The loss of a shared-prefix sequence does not depend on its prefix tokens' log-probs."""

    learner = session.learner
    ids = session.engine.encode("Q:7*3-2|")
    resp = session.engine.encode("7*3=1</thought>1-2=9</thought>\\boxed{9}</thought>")
    from srpo_core.learner import TrainSequence

    seq = TrainSequence(ids, resp, 6, 1.0, [-0.5] * (len(resp) - 6), 0)
    full, attn, targets, mask, old, keep = learner._tensors([seq])
    p, s0 = len(ids), len(ids) + 6 - 1  # s0: the first trained next-token position
    assert keep == p + len(resp) - s0 and targets[0].tolist() == resp[6:]
    assert mask[0].nonzero()[:, 0].tolist() == list(range(len(resp) - 6))
    assert old[0].tolist() == pytest.approx([-0.5] * (len(resp) - 6))
    # logits of the kept positions only: the same numbers as the full forward's
    with torch.no_grad():
        whole = learner.model(input_ids=full, attention_mask=attn).logits[:, s0:-1]
        kept = learner.model(input_ids=full, attention_mask=attn, logits_to_keep=keep).logits[:, :-1]
    assert kept.shape == whole.shape and torch.allclose(kept, whole, atol=1e-6)
