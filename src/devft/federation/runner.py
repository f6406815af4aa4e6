"""Run one method end to end on a Flower runtime, after checking every input up front."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from devft.config import RunConfig
from devft.core.fusion import check_beta_for_stages
from devft.core.recipes import FUSING_RECIPES
from devft.core.staging import method_schedule
from devft.data import federated_data
from devft.errors import ConfigError
from devft.federation.client_app import make_client_app
from devft.federation.grid import InProcessGrid
from devft.federation.server_app import make_server_app
from devft.files import read_json_object
from devft.lock import output_lock
from devft.methods import get_method
from devft.models.loading import load_base_model, resolve_device
from devft.models.lora import target_modules
from devft.models.quantize import require_bitsandbytes
from devft.reporting.recorder import SUMMARY_FILE

log = logging.getLogger(__name__)


def prepare(cfg: RunConfig) -> None:
    """Check the model, the data, the stages and the LoRA targets before any training.

    Raises a `DevFTError` (ConfigError, DataError, ModelError) naming what is wrong.
    """
    resolve_device(cfg.model.device)
    require_bitsandbytes(cfg.model.quantization)
    base = load_base_model(cfg.model)
    target_modules(cfg.lora, base.family, base.model)
    method = get_method(cfg.method)
    if method.staged:
        d = cfg.devft
        schedule = method_schedule(method, cfg, base.num_layers)
        if method.fusion == "differential" and method.recipe in FUSING_RECIPES:
            check_beta_for_stages(base.num_layers, [s.num_layers for s in schedule], d.beta)
    federated_data(cfg.data, cfg.federation.num_clients, cfg.seed)


def client_resources(cfg: RunConfig) -> dict[str, float]:
    """Ray resources of each simulated client: one CPU and `federation.client_gpus` GPUs
    (auto: the visible GPUs shared evenly by the clients of a round, whole GPUs above 1)."""
    import torch

    fed = cfg.federation
    visible = torch.cuda.device_count() if cfg.model.device != "cpu" else 0
    if fed.client_gpus == "auto":
        share = visible / (fed.clients_per_round or fed.num_clients)
        gpus = share if share <= 1 else float(math.floor(share))
    else:
        gpus = float(fed.client_gpus)
        if gpus > visible:
            raise ConfigError("federation.client_gpus", fed.client_gpus,
                              f"at most the {visible} GPU(s) visible here, or auto")
    return {"num_cpus": 1, "num_gpus": gpus}


def run_method(cfg: RunConfig) -> dict[str, Any]:
    """Run `cfg.method` on `cfg.federation.runtime`, holding the output directory's lock;
    returns the run's summary."""
    with output_lock(cfg.output.dir, f"devft run --method {cfg.method}"):
        prepare(cfg)
        resources = client_resources(cfg) if cfg.federation.runtime == "simulation" else {}
        _run_on_runtime(cfg, resources)
    return read_json_object(Path(cfg.output.dir) / SUMMARY_FILE)


def _run_on_runtime(cfg: RunConfig, resources: dict[str, float]) -> None:
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
            backend_config={"client_resources": resources},
        )
