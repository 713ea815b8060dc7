"""Train and evaluate with SRPO, RRPO or GRPO. Each epoch step runs as its own Metaflow run of
flows/srpo_step_flow.py; this flow prepares, launches them in order, and reports.

    python flows/srpo_flow.py run                                   # the demo preset (GRPO on long chains), CPU, minutes
    SRPO_CONFIG=paper python flows/srpo_flow.py run --with kubernetes
    python flows/srpo_flow.py run --method grpo --seed 42 --set "eval.every_steps=2"
    python flows/srpo_flow.py run --training-id ID                  # resume a killed training
    python flows/srpo_flow.py run --show-steps true                 # the epoch-step runs' task logs on the console too

The console shows one progress display (srpo_core/progress.py); the epoch-step runs' task logs go
to srpo_logs/<training_id>/steps.log (printed at the start).
"""

import os

from metaflow import Config, FlowSpec, Parameter, step

from srpo_core.flow_config import default_config_path, parse_config
from srpo_core.metaflow_env import ensure_metaflow_user

ensure_metaflow_user()


class SRPOFlow(FlowSpec):
    """Steps:

    start       resolve the config and flags, fail fast (data, artifact store, MLflow), find the
                resume point of --training-id, open the MLflow run; with rollout.server_url auto,
                start the training's inference server (one for all epoch steps)
    train_step  launch the next epoch-step run (SRPOStepFlow) with Metaflow's Runner, passing on
                the datastore and --with settings, follow it (phase running, task logs to the
                log file), log its metrics and evaluations to MLflow; repeats itself until the last step
    end         stop the server, summary table, plots to MLflow, where to look
    """

    config = Config("config", default=default_config_path, parser=parse_config)
    method = Parameter("method", default="", help="a registered method: grpo, rrpo, srpo, score, critique_grpo, spo_tree, srppo (default: the config's)")
    split = Parameter("split", default="", help="1x4 | 2x4 | 1x8")
    localizer = Parameter("localizer", default="", help="random | self | oracle | divergence")
    seed = Parameter("seed", default=-1, type=int, help="training seed (default: the config's)")
    steps = Parameter("steps", default=0, type=int, help="stop after this many epoch steps (0: all)")
    overrides = Parameter("set", default="", help="space-separated key=value config overrides")
    training_id = Parameter("training-id", default="", help="resume this training (or name a new one)")
    show_steps = Parameter("show-steps", default=False, type=bool, help="also print the epoch-step runs' task logs (always in the log file)")
    quiet_steps = Parameter("quiet-steps", default=False, type=bool, help="kept for old commands: the task logs are off the console by default")

    @step
    def start(self):
        from srpo_core.flow_driver import announce, apply_overrides, prepare, start_training_server

        cfg = apply_overrides(self.config.to_dict(), self.method, self.split, self.localizer, self.seed, self.overrides, self.steps)
        self.plan = prepare(cfg, self.training_id)
        self.reports = []
        announce(self.plan)
        self.status = "more" if self.plan.next_step < self.plan.total_steps else "done"
        if self.status == "more":
            start_training_server(self.plan, watch_pid=os.getppid())  # the Metaflow runtime: the server ends with it
        self.next({"more": self.train_step, "done": self.end}, condition="status")

    @step
    def train_step(self):
        from srpo_core.flow_driver import launch_step, log_report, stop_training_server

        try:
            report = launch_step(self.plan, self.plan.next_step, show_output=self.show_steps and not self.quiet_steps)
        except BaseException:
            stop_training_server(self.plan)
            raise
        log_report(self.plan, report)
        self.reports = self.reports + [report]
        self.plan.next_step += 1
        self.status = "more" if self.plan.next_step < self.plan.total_steps else "done"
        self.next({"more": self.train_step, "done": self.end}, condition="status")

    @step
    def end(self):
        from srpo_core.flow_driver import finish, stop_training_server

        stop_training_server(self.plan)
        self.summary = finish(self.plan, self.reports)


if __name__ == "__main__":
    from srpo_core.progress import console_progress

    with console_progress():
        SRPOFlow()
