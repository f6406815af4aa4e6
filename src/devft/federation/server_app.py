"""The ServerApp: runs the method's stages through Flower, one `Strategy.start` per stage.

`app` reads its config from Flower's run_config (for `flwr run`); `make_server_app(cfg)`
binds a config directly (in-process grid and `run_simulation`, whose run_config is empty).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from devft.config import RunConfig, from_run_config
from devft.federation.global_model import GlobalModel
from devft.federation.grid import MeteredGrid
from devft.federation.strategy import StagedStrategy
from devft.federation.wire import from_array_record, to_array_record
from devft.models.lora import lora_parameter_count
from devft.models.submodel import StagePlan
from devft.reporting.plots import plot_run
from devft.reporting.recorder import RunRecorder

log = logging.getLogger(__name__)


def run_server(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run every stage of `cfg.method` over `grid`; write metrics, summary, adapter and plot."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    metered = MeteredGrid(grid)
    model = GlobalModel(cfg)
    schedule = model.schedule()
    strategy = StagedStrategy(cfg)
    recorder = RunRecorder(out, cfg.method, sum(s.rounds for s in schedule), cfg.output.progress)
    offset = 0
    for stage in schedule:
        plan, sub_lora = model.plan_stage(stage)
        recorder.stage_started(stage.index, stage.num_layers, stage.rounds, plan.group_lists())
        strategy.begin_stage(plan, offset)

        def evaluate(
            server_round: int,
            arrays: ArrayRecord,
            plan: StagePlan = plan,
            offset: int = offset,
            trainable: int = lora_parameter_count(sub_lora),
        ) -> MetricRecord | None:
            if server_round == 0 and offset > 0:
                return None  # stage start: the full model equals the previous round's
            record = _end_round(
                model,
                strategy,
                metered,
                recorder,
                plan,
                offset + server_round,
                server_round,
                arrays,
                trainable,
            )
            return MetricRecord({"eval_loss": record["eval_loss"]})

        strategy.start(
            grid=metered,
            initial_arrays=to_array_record(sub_lora),
            num_rounds=stage.rounds,
            evaluate_fn=evaluate,
        )
        offset += stage.rounds
    model.save_adapter(out / "adapter")
    summary = recorder.finish(
        {
            "model": cfg.model.path,
            "depth": model.depth,
            "num_clients": cfg.federation.num_clients,
            "seed": cfg.seed,
        }
    )
    plot_run(recorder.records, out / "loss.png")
    return summary


def _end_round(
    model: GlobalModel,
    strategy: StagedStrategy,
    metered: MeteredGrid,
    recorder: RunRecorder,
    plan: StagePlan,
    global_round: int,
    stage_round: int,
    arrays: ArrayRecord,
    trainable: int,
) -> dict[str, Any]:
    """Transfer the aggregated adapter into the full model, evaluate, and record the round."""
    sub_lora = from_array_record(arrays)
    model.absorb(plan, sub_lora)
    full = plan.is_full(model.depth)
    down, up, failed = metered.take_counts()
    record: dict[str, Any] = {
        "round": global_round,
        "stage": plan.stage,
        "stage_round": stage_round,
        "layers_trained": plan.num_layers,
        "trainable_params": trainable,
        "bytes_down": down,
        "bytes_up": up,
        "eval_loss": recorder.timed_eval(model.eval_full),
        "sub_eval_loss": None if full else recorder.timed_eval(model.eval_submodel, plan, sub_lora),
    }
    if stage_round > 0:
        record.update(strategy.last_train)
        record["clients_failed"] = max(record.get("clients_failed", 0), failed)
    return recorder.record_round(record)


def make_server_app(cfg: RunConfig | None = None) -> ServerApp:
    """A ServerApp bound to `cfg` (None: read the config from the run's run_config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg or from_run_config(context.run_config))

    return app


app = make_server_app()
