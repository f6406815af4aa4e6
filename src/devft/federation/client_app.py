"""The ClientApp: builds the stage submodel, trains LoRA on its own partition, replies.

The client receives the stage plan (groups, β, fusion) and the submodel's LoRA; it fuses the
frozen base layers itself from its own copy of the base model, so dense weights never cross
the wire. Its data partition is `partition-id` of its node config.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from devft.config import RunConfig, from_run_config
from devft.data import collate, encode, federated_data
from devft.federation.wire import from_array_record, plan_from_config, to_array_record
from devft.models.loading import load_base_model
from devft.models.lora import get_lora_state, set_lora_state
from devft.models.submodel import stage_model
from devft.training.local import train_local


def client_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """One round of local training on this node's partition."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    config = msg.content["config"]
    plan = plan_from_config(config)
    round_ = int(config["global-round"])
    partition = int(context.node_config["partition-id"])
    base = load_base_model(cfg.model)
    data = federated_data(cfg.data, cfg.federation.num_clients, cfg.seed)
    model = stage_model(base, plan, cfg.lora)
    set_lora_state(model, from_array_record(msg.content["arrays"]))
    tok = base.tokenizer
    batches = [
        collate([encode(r, tok, cfg.data.max_seq_len) for r in records], tok.pad_token_id)
        for records in data.client_batches(
            partition, round_, cfg.train.local_steps, cfg.train.batch_size, cfg.seed
        )
    ]
    inner = model.base_model.model
    result = train_local(
        model,
        batches,
        cfg.train,
        layers=base.family.layers(inner),
        head=inner.get_output_embeddings(),
        seed=int(np.random.SeedSequence([cfg.seed, partition, round_]).generate_state(1)[0]),
        progress=cfg.output.progress,
        desc=f"client {partition} stage {plan.stage}",
    )
    metrics = MetricRecord(
        {
            "num-examples": result.examples,
            "train-loss": result.mean_loss,
            "steps": result.steps,
            "tokens": result.tokens,
            "flops": result.flops_est,
            "train-time-s": result.train_time_s,
            "peak-mem-bytes": result.peak_mem_bytes,
            "mem-delta-bytes": result.mem_delta_bytes,
        }
    )
    reply = RecordDict({"arrays": to_array_record(get_lora_state(model)), "metrics": metrics})
    return Message(reply, reply_to=msg)


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp bound to `cfg` (None: read the config from the run's run_config)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return client_train(msg, context, cfg or from_run_config(context.run_config))

    return app


app = make_client_app()
