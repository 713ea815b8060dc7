"""One epoch step of an SRPO / RRPO / GRPO training, as its own Metaflow run.

Launched by flows/srpo_flow.py (one run per step, tagged training_id, method, seed, step); it
can also be run by hand: `python flows/srpo_step_flow.py run --context '{"training_id": ...}'`.
"""

import json
import time

from metaflow import Config, FlowSpec, Parameter, current, resources, retry, step, timeout

from srpo_core.flow_config import default_config_path, parse_config
from srpo_core.metaflow_env import ensure_metaflow_user

ensure_metaflow_user()


class SRPOStepFlow(FlowSpec):
    """Steps (per prompt shard, in parallel, between `start` and `join`):

    start          cut the step's prompts into shards (foreach)
    generate       first round of the seed search (GRPO: the whole group)          [GPU]
    verify         score it; seeds and base candidates (no torch)
    localize       finish the seed search, fill base groups, localize the seeds     [GPU]
    suffix         sample G suffixes from each reset prefix x*                      [GPU]
    verify_suffix  score fills and suffixes, build the rollout records (no torch)
    join           gather the shards
    learner        advantages, LoRA update, checkpoint + manifest, move `latest`    [GPU]
    evaluate       greedy evaluation when due (before training, every_steps, last)  [GPU]
    end            metrics for the training flow
    """

    config = Config("config", default=default_config_path, parser=parse_config)
    context = Parameter("context", required=True, help="JSON: training_id, step, artifact_root, parent_step, total_steps, server_url, learner_dir")

    @step
    def start(self):
        from srpo_core.flow_phases import StepContext, plan_shards

        self.t0 = time.time()
        c = json.loads(self.context)
        self.ctx = StepContext(self.config.to_dict(), c["training_id"], int(c["step"]), current.run_id, c["artifact_root"], c["parent_step"], c.get("server_url", ""), c.get("learner_dir", ""))
        self.total_steps = int(c["total_steps"])
        self.shards = list(enumerate(plan_shards(self.ctx, int(self.config.resources.shards))))
        self.next(self.generate, foreach="shards")

    @retry(times=1)
    @timeout(minutes=config.resources.generation.timeout_minutes)
    @resources(cpu=config.resources.generation.cpu, gpu=config.resources.generation.gpu, memory=config.resources.generation.memory)
    @step
    def generate(self):
        from srpo_core.flow_phases import phase_generate

        self.shard_index, item_ids = self.input
        self.key = phase_generate(self.ctx, self.shard_index, item_ids, current.retry_count)
        self.next(self.verify)

    @retry(times=1)
    @timeout(minutes=config.resources.verification.timeout_minutes)
    @resources(cpu=config.resources.verification.cpu, memory=config.resources.verification.memory)
    @step
    def verify(self):
        from srpo_core.flow_phases import phase_verify

        self.key = phase_verify(self.ctx, self.shard_index, self.key, current.retry_count)
        self.next(self.localize)

    @retry(times=1)
    @timeout(minutes=config.resources.localization.timeout_minutes)
    @resources(cpu=config.resources.localization.cpu, gpu=config.resources.localization.gpu, memory=config.resources.localization.memory)
    @step
    def localize(self):
        from srpo_core.flow_phases import phase_localize

        self.key = phase_localize(self.ctx, self.shard_index, self.key, current.retry_count)
        self.next(self.suffix)

    @retry(times=1)
    @timeout(minutes=config.resources.suffix.timeout_minutes)
    @resources(cpu=config.resources.suffix.cpu, gpu=config.resources.suffix.gpu, memory=config.resources.suffix.memory)
    @step
    def suffix(self):
        from srpo_core.flow_phases import phase_suffix

        self.key = phase_suffix(self.ctx, self.shard_index, self.key, current.retry_count)
        self.next(self.verify_suffix)

    @retry(times=1)
    @timeout(minutes=config.resources.verification.timeout_minutes)
    @resources(cpu=config.resources.verification.cpu, memory=config.resources.verification.memory)
    @step
    def verify_suffix(self):
        from srpo_core.flow_phases import phase_verify_suffix

        self.key = phase_verify_suffix(self.ctx, self.shard_index, self.key, current.retry_count)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.shard_keys = [inp.key for inp in sorted(inputs, key=lambda i: i.shard_index)]
        self.merge_artifacts(inputs, include=["ctx", "total_steps", "t0"])
        self.next(self.learner)

    @timeout(minutes=config.resources.learner.timeout_minutes)
    @resources(cpu=config.resources.learner.cpu, gpu=config.resources.learner.gpu, memory=config.resources.learner.memory, shared_memory=config.resources.learner.shared_memory)
    @step
    def learner(self):
        from srpo_core.flow_phases import phase_learn

        outcome = phase_learn(self.ctx, self.shard_keys)
        self.checkpoint, self.metrics = outcome.checkpoint, outcome.metrics
        self.next(self.evaluate)

    @timeout(minutes=config.resources.evaluation.timeout_minutes)
    @resources(cpu=config.resources.evaluation.cpu, gpu=config.resources.evaluation.gpu, memory=config.resources.evaluation.memory)
    @step
    def evaluate(self):
        from srpo_core.flow_phases import phase_evaluate

        start = time.perf_counter()
        self.evaluations = phase_evaluate(self.ctx, self.total_steps, progress=False)
        self.eval_seconds = time.perf_counter() - start
        self.next(self.end)

    @step
    def end(self):
        m = self.metrics
        # compute on the critical path: slowest shard per phase, then learner and evaluation
        self.phase_seconds = sum(m.get(f"time/{k}", 0.0) for k in ("generation", "verification", "localization", "suffix", "learner")) + self.eval_seconds
        self.metrics = {**m, "time/evaluation": self.eval_seconds}
        print(f"epoch step {self.ctx.step}: checkpoint {self.checkpoint}, reward/base {m.get('reward/base/mean', float('nan')):.3f}")


if __name__ == "__main__":
    SRPOStepFlow()
