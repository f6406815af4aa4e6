"""The ClientApp: builds the stage submodel, trains LoRA on its own partition, replies.

The client receives the stage plan (groups, β, fusion) and the tensors its rule sends. It
builds only its stage (`devft.models.client_stage`): the stage's layers fused tensor by
tensor from the base's memory-mapped safetensors files (or from the base this process
already holds, in the in-process grid), so dense weights never cross the wire; one stage is
held at a time. With `model.ship_layers` the server sends the fused layers instead. Rules
that change the base (FLoRA merges into it) load the full base, as before. Its data
partition is `partition-id` of its node config; a node whose config names a `data-shard`
file (`devft shard`) reads only that, never the whole data set, and with the shard's token
ids (same tokenizer files and max_seq_len) it never loads its tokenizer. What the rule
keeps between rounds (FedSA-LoRA's B, FFA-LoRA's A) lives in the node's `context.state`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from devft.config import LoraSettings, RunConfig, from_run_config
from devft.core.frozen import drop_layers, fill_frozen, in_layers
from devft.core.shrink import table_from_wire
from devft.core.stagemaps import fuse_state
from devft.data import SHARD_NODE_KEY, client_shard, collate, encode, length_sorted_batches
from devft.errors import ConfigError
from devft.federation.budgets import MIB, RoundWork, plan_work, round_shape
from devft.federation.progress import OPERATOR, data_line, enable_operator_log
from devft.federation.shipping import shipped_source
from devft.federation.wire import from_array_record, plan_from_config, to_array_record
from devft.models.client_stage import (
    client_layout,
    client_stage_model,
    client_tokenizer,
    set_gradient_checkpointing,
    tokenizer_digest,
)
from devft.models.lora import get_lora_state, set_lora_state, set_trainable
from devft.models.memory_plan import client_floor_bytes
from devft.models.submodel import StagePlan, stage_model
from devft.rules import ClientEnv, ClientStore, Rule, make_rule
from devft.training.accounting import peak_rss_bytes
from devft.training.allocator import return_freed_memory
from devft.training.evaluation import heldout_batches, heldout_loss
from devft.training.local import train_local

log = logging.getLogger(__name__)


def _env(cfg: RunConfig, rule: Rule, plan: StagePlan, msg: Message,
         context: Context) -> tuple[ClientEnv, Any]:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    partitions = int(context.node_config.get("num-partitions", cfg.federation.num_clients))
    if partitions != cfg.federation.num_clients:
        raise ConfigError("num-partitions (node config)", partitions,
                          f"federation.num_clients={cfg.federation.num_clients} of the run: "
                          "every client must split the data the same way")
    layout = client_layout(cfg.model)
    config = dict(msg.content["config"])
    partition = int(context.node_config["partition-id"])
    data = client_shard(cfg.data, cfg.federation.num_clients, cfg.seed, partition,
                        context.node_config.get(SHARD_NODE_KEY))
    env = ClientEnv(cfg=cfg, plan=plan, prefix=layout.family.lora_prefix(),
                    partition=partition, round=int(config["global-round"]), config=config,
                    store=ClientStore(context.state), data=data,
                    extra={"depth": layout.depth})
    return env, layout


def _model(cfg: RunConfig, rule: Rule, plan: StagePlan, settings: LoraSettings, msg: Message,
           context: Context, received: Any, env: ClientEnv) -> tuple[Any, Any]:
    """The stage model and the tokenizer it came with: the full base (and its tokenizer)
    for rules that change it, else the stage alone (from the base's files, or from shipped
    layers) and None: the tokenizer is loaded only if the rows need tokenizing."""
    if rule.private_base:  # FLoRA merges into the base: the client needs all of it
        base = rule.base_model()
        rule.prepare(received, env, base)
        return stage_model(base, plan, settings), base.tokenizer
    rule.prepare(received, env, None)
    shipped = None
    if cfg.model.ship_layers:
        shipped = shipped_source(msg, context, plan, cfg, client_layout(cfg.model).layer_prefix())
    return client_stage_model(cfg.model, plan, settings, shipped), None


_REPORTED: set[tuple[int, str]] = set()


def _shard_tokens(cfg: RunConfig, data: Any) -> int | None:
    """The pad id when the shard's token ids serve this run (its tokenizer files and
    max_seq_len), else None: the client tokenizes (a mismatch is logged once)."""
    if data.encoding is None:
        return None
    why = data.encoding_mismatch(cfg.data.max_seq_len, tokenizer_digest(cfg.model))
    if why is None:
        return int(data.encoding["pad_token_id"])
    if (data.partition, why) not in _REPORTED:
        _REPORTED.add((data.partition, why))
        log.warning("client %d: the shard's token ids are not used (%s); tokenizing its rows",
                    data.partition, why)
    return None


def _train_batches(cfg: RunConfig, env: ClientEnv, tok: Any) -> list[dict[str, Any]]:
    """This round's local batches, from the shard's token ids when they serve this run."""
    seed = cfg.seed if cfg.train.batch_seed < 0 else cfg.train.batch_seed
    args = (env.round, cfg.train.local_steps, cfg.train.batch_size, seed)
    pad = _shard_tokens(cfg, env.data)
    if pad is not None:
        return [collate(e, pad) for e in env.data.encoded_batches(*args)]
    tok = tok or client_tokenizer(cfg.model)
    return [collate([encode(r, tok, cfg.data.max_seq_len) for r in records], tok.pad_token_id)
            for records in env.data.batches(*args)]


def _eval_batches(cfg: RunConfig, env: ClientEnv, tok: Any) -> list[dict[str, Any]]:
    pad = _shard_tokens(cfg, env.data)
    if pad is not None:
        return length_sorted_batches(env.data.eval_encoded, cfg.data.eval_batch_size, pad)
    return heldout_batches(env.data.eval_rows, tok or client_tokenizer(cfg.model), cfg.data)


def _round_work(cfg: RunConfig, plan: StagePlan, env: ClientEnv, msg: Message,
                context: Context) -> tuple[RoundWork, list[dict[str, Any]]]:
    """This round's work under the client's memory budget, planned on this round's batches
    (drawn first; the process's floor is read before its tokenizer loads)."""
    client_floor_bytes()
    batches = _train_batches(cfg, env, None)
    config = msg.content["config"]
    spectral = (table_from_wire(config["shrink-groups"], config["shrink-sizes"])
                if "shrink-groups" in config else None)
    shape = round_shape(batches, cfg.data.max_seq_len)
    return plan_work(cfg, plan, env.partition, env.round, dict(context.node_config), spectral,
                     shape), batches


def _budget_record(work: RoundWork, env: ClientEnv, stage: StagePlan) -> ConfigRecord:
    return ConfigRecord({**work.record(env.partition, stage),
                         "process-peak-mb": peak_rss_bytes() / MIB})


def client_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """One round of local training on this node's partition (or of its shrunken submodel,
    or none, under its memory budget: `devft.federation.budgets`)."""
    if cfg.train.release_memory:
        return_freed_memory()
    rule = make_rule(cfg)
    stage = plan = plan_from_config(msg.content["config"])
    env, layout = _env(cfg, rule, plan, msg, context)
    OPERATOR.info(data_line(env.partition, cfg.federation.num_clients, env.data.size,
                            context.node_config.get(SHARD_NODE_KEY), cfg.data.name))
    work, batches = _round_work(cfg, plan, env, msg, context) \
        if cfg.federation.has_budgets else (None, None)
    if work is not None and work.sat_out:  # `exclude`: its round's submodel does not fit
        return Message(RecordDict({
            "arrays": ArrayRecord(), "budget": _budget_record(work, env, stage),
            "metrics": MetricRecord({"num-examples": env.data.size, "sat-out": 1})}),
            reply_to=msg)
    received = from_array_record(msg.content["arrays"])
    if work is not None:
        if work.shrunk:  # its layers' LoRA fused from the stage's, as a stage's is
            assert work.groups is not None
            received = fuse_state(received, work.groups, plan.beta, plan.fusion, env.prefix)
            plan = env.plan = work.plan(stage)
        if work.quantization != cfg.model.quantization:
            cfg = cfg.replace(**{"model.quantization": work.quantization})
    model, tok = _model(cfg, rule, plan, rule.lora_settings(env), msg, context, received, env)
    template, frozen = get_lora_state(model), plan.frozen  # frozen: an emulator's layers
    set_lora_state(model, fill_frozen(rule.begin(received, env, template), template, frozen,
                                      env.prefix))
    set_trainable(model, lambda k: rule.trainable(k) and not in_layers(k, frozen, env.prefix))
    set_gradient_checkpointing(model, cfg.train.gradient_checkpointing if work is None
                               else work.checkpointing)
    batches = batches or _train_batches(cfg, env, tok)
    inner = model.base_model.model

    def default_update():
        seq = np.random.SeedSequence([cfg.seed, env.partition, env.round])
        seed = int(seq.generate_state(1)[0])
        return train_local(model, batches, cfg.train, layers=layout.family.layers(inner),
                           head=inner.get_output_embeddings(), seed=seed,
                           progress=cfg.output.progress,
                           desc=f"client {env.partition} stage {plan.stage}")

    result = rule.local_update(model, batches, env, default_update)
    metrics = MetricRecord({  # num-examples: FedAvg's weight n_k, the partition's size
        "num-examples": env.data.size,
        "examples-processed": result.examples, "train-loss": result.mean_loss,
        "steps": result.steps,
        "tokens": result.tokens, "flops": result.flops_est, "train-time-s": result.train_time_s,
        "peak-mem-bytes": result.peak_mem_bytes, "mem-delta-bytes": result.mem_delta_bytes,
    })
    upload = rule.end(drop_layers(get_lora_state(model), frozen, env.prefix), env)
    content = RecordDict({"arrays": to_array_record(upload), "metrics": metrics})
    if work is not None:
        content["budget"] = _budget_record(work, env, stage)
    return Message(content, reply_to=msg)


def client_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Personalized evaluation: the full model with the server's tensors + this client's own.
    Under a memory budget the client plans the full model as a training round (an upper
    bound on a forward pass): with its levers' quantization, or it sits the evaluation out."""
    rule = make_rule(cfg)
    env, layout = _env(cfg, rule, StagePlan.full(0), msg, context)
    env.plan = StagePlan.full(layout.depth)
    if cfg.federation.has_budgets and not rule.private_base:
        client_floor_bytes()
        batches = _eval_batches(cfg, env, None)
        work = plan_work(cfg, env.plan, env.partition, env.round, dict(context.node_config),
                         None, round_shape(batches, cfg.data.max_seq_len))
        if work.sat_out:
            return Message(RecordDict({
                "metrics": MetricRecord({"num-examples": len(env.data.eval_rows)}),
                "budget": _budget_record(work, env, env.plan)}), reply_to=msg)
        cfg = cfg.replace(**{"model.quantization": work.quantization})
    else:
        batches = None
    if rule.private_base:
        base = rule.base_model()
        model, tok = stage_model(base, env.plan, cfg.lora), base.tokenizer
    else:  # the full model is a stage too: it replaces the held training stage
        model, tok = client_stage_model(cfg.model, env.plan, cfg.lora), None
    lora = rule.personal_lora(from_array_record(msg.content["arrays"]), env,
                              get_lora_state(model))
    set_lora_state(model, lora)
    loss = heldout_loss(model, batches or _eval_batches(cfg, env, tok), cfg.train.precision)
    metrics = MetricRecord({"eval-loss": loss, "num-examples": len(env.data.eval_rows)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp bound to `cfg` (None: read the config from the run's run_config)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if cfg is None:  # `flwr run`: this stdout goes to the SuperNode's log
            enable_operator_log()
        return client_train(msg, context, cfg or from_run_config(context.run_config))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_evaluate(msg, context, cfg or from_run_config(context.run_config))

    return app


app = make_client_app()
