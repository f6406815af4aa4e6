"""Run one method end to end on a Flower runtime, after checking every input up front."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from devft.config import RunConfig
from devft.core.fusion import check_beta_for_stages
from devft.core.recipes import FUSING_RECIPES
from devft.core.schedule import build_schedule
from devft.data import federated_data
from devft.federation.client_app import make_client_app
from devft.federation.grid import InProcessGrid
from devft.federation.server_app import make_server_app
from devft.methods import get_method
from devft.models.loading import load_base_model, resolve_device
from devft.models.lora import target_modules
from devft.reporting.recorder import SUMMARY_FILE

log = logging.getLogger(__name__)


def prepare(cfg: RunConfig) -> None:
    """Check the model, the data, the stages and the LoRA targets before any training.

    Raises a `DevFTError` (ConfigError, DataError, ModelError) naming what is wrong.
    """
    resolve_device(cfg.model.device)
    base = load_base_model(cfg.model)
    target_modules(cfg.lora, base.family, base.model)
    method = get_method(cfg.method)
    if method.staged:
        d = cfg.devft
        schedule = build_schedule(
            base.num_layers, d.stages, d.num_stages, d.rounds_per_stage, cfg.federation.rounds
        )
        if method.fusion == "differential" and method.recipe in FUSING_RECIPES:
            check_beta_for_stages(base.num_layers, [s.num_layers for s in schedule], d.beta)
    federated_data(cfg.data, cfg.federation.num_clients, cfg.seed)


def run_method(cfg: RunConfig) -> dict[str, Any]:
    """Run `cfg.method` on `cfg.federation.runtime`; returns the run's summary."""
    prepare(cfg)
    flwr_log = logging.getLogger("flwr")
    if flwr_log.level <= logging.DEBUG:  # flwr's own default logs every round; keep warnings
        flwr_log.setLevel(logging.WARNING)
    n = cfg.federation.num_clients
    if cfg.federation.runtime == "inprocess":
        grid = InProcessGrid(make_client_app(cfg), n)
        server = make_server_app(cfg)
        server(
            grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        )
    else:
        from flwr.simulation import run_simulation

        client_cfg = cfg.replace(**{"output.progress": False})  # client bars live in Ray's logs
        run_simulation(
            server_app=make_server_app(cfg),
            client_app=make_client_app(client_cfg),
            num_supernodes=n,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    return json.loads((Path(cfg.output.dir) / SUMMARY_FILE).read_text())
