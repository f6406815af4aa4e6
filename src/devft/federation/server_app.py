"""The ServerApp: runs the method's stages through Flower, one `Strategy.start` per stage.

`app` reads its config from Flower's run_config (for `flwr run`); `make_server_app(cfg)`
binds a config directly (in-process grid and `run_simulation`, whose run_config is empty).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from devft.config import RunConfig, from_run_config
from devft.config.compat import same_config
from devft.core.grouping import Groups
from devft.core.shrink import spectral_table
from devft.core.stopping import stop_summary
from devft.errors import DevFTError, RunStalledError
from devft.federation.budgets import check_budgets_fit
from devft.federation.checkpoint import (
    Checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from devft.federation.global_model import GlobalModel
from devft.federation.grid import MeteredGrid
from devft.federation.pacing import StagePacer
from devft.federation.progress import OPERATOR, enable_operator_log, round_line, summary_line
from devft.federation.shipping import STORE as SHIPPED_STORE
from devft.federation.strategy import StagedStrategy
from devft.federation.wire import to_array_record
from devft.files import atomic_dir, atomic_write_json
from devft.lock import output_lock
from devft.models.loading import release_private_base
from devft.models.submodel import StagePlan
from devft.reporting.card import CARD_FILE, adapter_card, name_base_model
from devft.reporting.plots import plot_run
from devft.reporting.recorder import RunRecorder, read_metrics
from devft.rules import make_rule
from devft.training.accounting import rss_bytes

log = logging.getLogger(__name__)


class ServerRun:
    """One run of `cfg.method`: the global model, the rule, the strategy and the recorder."""

    def __init__(self, grid: Grid, cfg: RunConfig) -> None:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.out = Path(cfg.output.dir)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", cfg.to_dict())
        self.client_grid = grid  # the in-process grid exposes client contexts for checkpoints
        self.grid = MeteredGrid(grid)
        self.rule = make_rule(cfg)
        self.model = GlobalModel(cfg, self.rule)
        self.schedule = self.model.schedule()
        personal = self._personal_tensors if self.rule.personalized else None
        if cfg.federation.has_budgets:  # a budget that fits no submodel: refused here
            check_budgets_fit(cfg, [s.num_layers for s in self.schedule])
        self.strategy = StagedStrategy(cfg, self.rule, self._aggregated, personal,
                                       [len(p) for p in self.model.data.partitions],
                                       layer_prefix=self.model.prefix)
        self.recorder = RunRecorder(self.out, cfg.method, sum(s.rounds for s in self.schedule),
                                    cfg.output.progress, fresh=not cfg.output.resume)
        self.pacer = StagePacer(cfg, self.model.method, self.schedule)
        self.plan: StagePlan | None = None
        self.stage_report: dict[str, Any] | None = None

    def run(self) -> dict[str, Any]:
        """Every stage through Flower (from the last checkpoint when resuming); then the
        adapter, summary and plot."""
        position = self._resume() if self.cfg.output.resume else (0, 0, 0)
        first_stage, done, offset = position
        try:
            for stage in self.schedule[first_stage:]:
                if done == 0:
                    self.plan, sub_lora = self.model.plan_stage(stage)
                    self.stage_report = self.model.stage_report
                    self.recorder.stage_started(stage.index, stage.num_layers, stage.rounds,
                                                self.plan.group_lists(), self.stage_report)
                    self.rule.start_stage(sub_lora, self.plan)
                trainable = self.rule.trainable_count()
                self.strategy.shrink_table = self._shrink_table()
                while (todo := self.pacer.next_rounds(stage, offset, done,
                                                      self.recorder.records)) > 0:
                    self.strategy.begin_stage(self.plan, offset, done)
                    self.strategy.start(
                        grid=self.grid, initial_arrays=to_array_record(self.rule.eval_lora()),
                        num_rounds=todo, timeout=self.cfg.federation.timeout_s,
                        evaluate_fn=lambda r, _a, t=trainable: self._end_round(r, t))
                    offset, done = offset + todo, done + todo
                self.recorder.stages[-1]["rounds"] = done  # adaptive: the rounds it ran
                done = 0
            with atomic_dir(self.out / "adapter") as adapter:
                if not self.rule.export(adapter, self.model):
                    self.model.save_adapter(adapter)
                name_base_model(adapter, self.cfg.model.path)
                (adapter / CARD_FILE).write_text(adapter_card(self.cfg, self.recorder.records))
        finally:
            release_private_base(self.cfg.output.dir)
        summary = self.recorder.finish({
            "model": self.cfg.model.path, "depth": self.model.depth,
            "num_clients": self.cfg.federation.num_clients, "seed": self.cfg.seed,
            "personalized_eval": self.rule.personalized,
            "total_dense_bytes_down": sum(r.get("dense_bytes_down") or 0
                                          for r in self.recorder.records),
            "stop": stop_summary(self.cfg.stop, self.pacer.stop_reason,
                                 self.recorder.records[-1]["round"]),
        })
        plot_run(self.recorder.records, self.out / "loss.png")
        OPERATOR.info(summary_line(summary, str(self.out.resolve())))
        return summary

    # ---- checkpoints -----------------------------------------------------------------------
    def _checkpoint(self, global_round: int, stage_round: int) -> None:
        rule_tensors, rule_meta = self.rule.state_dict()
        rng_meta, rng_tensors = rng_state()
        tensors = {"global-lora": self.model.lora, "rng": rng_tensors,
                   **{f"rule.{k}": v for k, v in rule_tensors.items()}}
        for node, context in getattr(self.client_grid, "contexts", {}).items():
            for name, record in context.state.items():
                if isinstance(record, ArrayRecord) and not name.startswith(SHIPPED_STORE):
                    tensors[f"client.{node}.{name}"] = record.to_torch_state_dict()
        plan = self.plan
        state = {
            "round": global_round, "stage": plan.stage, "stage_round": stage_round,
            "plan": {"groups": plan.group_lists(), "beta": plan.beta, "fusion": plan.fusion,
                     "frozen": list(plan.frozen)},
            "rule": rule_meta, "recorder": self.recorder.state(), "rng": rng_meta,
            "config": self.cfg.to_dict(),
        }
        save_checkpoint(self.out, global_round, Checkpoint(state, tensors))

    def _resume(self) -> tuple[int, int, int]:
        """Load the latest checkpoint; returns (stage index, rounds done in it, global round)."""
        ckpt = load_checkpoint(self.out)
        state, tensors = ckpt.state, ckpt.tensors
        loose = ("output", "stop")  # another stop rule extends (or shortens) the last stage
        if not same_config(state["config"], self.cfg.to_dict(), loose):
            raise DevFTError(f"--resume {self.out}: the checkpoint was written with another "
                             "config (only stop.* may differ); resume with the run's own "
                             "config.json")
        p = state["plan"]
        self.plan = StagePlan(state["stage"], tuple(tuple(g) for g in p["groups"]), p["beta"],
                              p["fusion"], tuple(p.get("frozen", ())))
        self.model.lora = tensors["global-lora"]
        rule_tensors = {k[5:]: v for k, v in tensors.items() if k.startswith("rule.")}
        self.rule.load_state_dict(rule_tensors, state["rule"], self.plan, self.model)
        for node, context in getattr(self.client_grid, "contexts", {}).items():
            head = f"client.{node}."
            for key, value in tensors.items():
                if key.startswith(head):
                    context.state[key[len(head):]] = ArrayRecord(value)
        records = [r for r in read_metrics(self.out) if r["round"] <= state["round"]]
        self.recorder.restore(state["recorder"], records)
        set_rng_state(state["rng"], tensors["rng"])
        log.info("resuming %s after round %d (stage %d, round %d of it)", self.cfg.method,
                 state["round"], state["stage"], state["stage_round"])
        return state["stage"], state["stage_round"], state["round"]

    def _shrink_table(self) -> dict[int, Groups]:
        """The spectral groups of every shallower depth of the stage, when clients may shrink
        with the spectral recipe: clustered on the base model's layer similarity (no LoRA, so
        a resumed run computes the same groups)."""
        fed, plan = self.cfg.federation, self.plan
        if not fed.shrinks or fed.shrink_recipe != "spectral" or plan is None:
            return {}
        return spectral_table(self.model.base_similarity(), plan.group_lists(),
                              self.cfg.devft.laplacian, self.cfg.seed)

    def _aggregated(self) -> None:
        """After each aggregation: rule-specific server work, then transfer to the full model."""
        self.rule.after_aggregate(self.model)
        self.model.absorb(self.plan, self.rule.eval_lora())

    def _personal_tensors(self) -> dict[str, Any]:
        """Full-model tensors each client combines with its private ones for evaluation."""
        return self.model.lora

    def _end_round(self, server_round: int, trainable: int) -> MetricRecord | None:
        """Evaluate the full model (and the submodel), record the round, checkpoint."""
        stage_round = self.strategy.stage_round(server_round)
        offset = self.strategy.round_offset
        if server_round == 0 and (offset > 0 or self.recorder.records):
            return None  # stage start / resume: the full model equals the previous round's
        plan, recorder = self.plan, self.recorder
        personalized = self.rule.personalized and server_round > 0
        counts = self.grid.take_counts()
        recorder.eval_time += counts.eval_seconds  # clients' personalized evaluation
        full = plan.is_full(self.model.depth)
        record: dict[str, Any] = {
            "round": offset + server_round, "stage": plan.stage, "stage_round": stage_round,
            "layers_trained": plan.num_layers, "trainable_params": trainable,
            "bytes_down": counts.down, "bytes_up": counts.up,
            "dense_bytes_down": counts.dense_down,
            "eval_bytes": counts.eval_down + counts.eval_up,
            "process_rss_bytes": rss_bytes(),
            "eval_loss": (self.strategy.last_eval if personalized
                          else recorder.timed_eval(self.model.eval_full)),
            "eval_mode": "personalized" if personalized else "global",
            "eval_loss_by_category": None if personalized else self.model.eval_by_category,
            "sub_eval_loss": None if full or self.rule.personalized else recorder.timed_eval(
                self.model.eval_submodel, plan, self.rule.eval_lora()),
        }
        if record["eval_loss"] is None:
            record["eval_loss"] = math.nan
        if self.pacer.adaptive and not full:  # what decides the stage's length
            record["sub_calib_loss"] = recorder.timed_eval(
                self.model.calib_submodel, plan, self.rule.eval_lora())
        record["adapter_norms"] = self.model.adapter_norms(None if full else self.rule.eval_lora())
        if self.stage_report is not None:  # the first record after a stage's plan
            record["stage_start"], self.stage_report = self.stage_report, None
        if server_round > 0:
            record.update(self.strategy.last_train)
            record["clients_failed"] = max(record.get("clients_failed", 0), counts.failed)
        record = recorder.record_round(record)
        OPERATOR.info(round_line(record, recorder.total_rounds, len(self.schedule)))
        self._checkpoint(record["round"], stage_round)
        return MetricRecord({"eval_loss": record["eval_loss"]})


def run_server(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run every stage of `cfg.method` over `grid`; write metrics, summary, adapter and plot.

    Holds the output directory's lock (`devft.lock`) for the whole run."""
    with output_lock(cfg.output.dir, f"devft run --method {cfg.method}"):
        return ServerRun(grid, cfg).run()


def make_server_app(cfg: RunConfig | None = None) -> ServerApp:
    """A ServerApp bound to `cfg` (None: read the config from the run's run_config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is not None:
            run_server(grid, cfg)
            return
        enable_operator_log()  # `flwr run`: this stdout is what `flwr log` shows
        try:
            run_server(grid, from_run_config(context.run_config))
        except DevFTError as err:  # the CLI's one line, for the submitter's `flwr log`
            if isinstance(err, RunStalledError):  # its hint names the in-process command
                err = RunStalledError(f"{err} (with `flwr run`: resubmit the same "
                                      "--run-config plus output.resume=true)")
            OPERATOR.error("error: %s", err)
            raise RuntimeError(f"devft: error: {err}") from None

    return app


app = make_server_app()
