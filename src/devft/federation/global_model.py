"""The server's global model: the full model's LoRA and the stage operations on it.

Per stage: group the layers on the current global model, fuse each group's LoRA into the
submodel's initial adapter, except never-trained groups, which start from a fresh init
(devft.core.initial_adapter); clients fuse the frozen base weights themselves from their own
copy of the base model. Per round: transfer the aggregated submodel LoRA back to the full
model and evaluate both. No flwr here; the strategy and ServerApp drive it.

Every stage's report includes the submodel's calibration loss with its initial LoRA
(`start_calib_loss`); calibrated methods also pick β there (core/calibration.py), and
frozen (emulator) layers are dropped from the submodel adapter (core/frozen.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devft.config import RunConfig
from devft.core.adapter_stats import adapter_norms, stage_start_report
from devft.core.calibration import fusion_grid, pick_best
from devft.core.frozen import drop_layers, fill_frozen, transfer_groups
from devft.core.fusion import clamped_groups
from devft.core.grouping import Groups, format_groups
from devft.core.initial_adapter import initial_submodel_adapter
from devft.core.layerstate import StateDict
from devft.core.schedule import Stage
from devft.core.stagemaps import transfer_state
from devft.core.staging import method_groups, method_schedule
from devft.data import collate, encode, federated_data
from devft.methods import get_method
from devft.models.layer_similarity import hidden_similarity, weight_similarity
from devft.models.loading import BaseModel
from devft.models.lora import get_lora_state, seeded_lora_init, set_lora_state
from devft.models.submodel import StagePlan, stage_model
from devft.rules import Rule
from devft.training.evaluation import categorized_heldout_batches, heldout_loss, heldout_losses

log = logging.getLogger(__name__)


class GlobalModel:
    """Full-model LoRA state plus grouping, fusion, transfer and evaluation for the server."""

    def __init__(self, cfg: RunConfig, rule: Rule) -> None:
        self.cfg = cfg
        self.method = get_method(cfg.method)
        self.base: BaseModel = rule.base_model()
        self.depth = self.base.num_layers
        self.prefix = self.base.family.lora_prefix()
        self.data = federated_data(cfg.data, cfg.federation.num_clients, cfg.seed)
        self.full = stage_model(self.base, StagePlan.full(self.depth), cfg.lora,
                                cfg.model.quantization)
        self.lora: StateDict = seeded_lora_init(self.full, cfg.seed)
        self.initial_lora: StateDict = {k: v.clone() for k, v in self.lora.items()}
        self._base_similarity: np.ndarray | None = None
        self.stage_report: dict[str, Any] = {}
        """Adapter norms, fusion cross term, fresh and clamped groups of the last plan_stage."""
        tok, max_len = self.base.tokenizer, cfg.data.max_seq_len
        self.eval_batches, self.eval_categories = categorized_heldout_batches(
            self.data.eval_records(), tok, cfg.data)
        self.eval_by_category: dict[str, float] = {}
        """The last `eval_full`'s mean loss per category of the evaluation rows."""
        calib = self.data.calibration_indices(cfg.devft.calibration_examples)
        self.calibration = collate(
            [encode(self.data.records[i], tok, max_len) for i in calib], tok.pad_token_id
        )

    def schedule(self) -> list[Stage]:
        return method_schedule(self.method, self.cfg, self.depth)

    # ---- stage operations ----------------------------------------------------------------
    def similarity(self) -> torch.Tensor:
        """(L, L) layer similarity of the current global model (config: devft.similarity)."""
        set_lora_state(self.full, self.lora)
        if self.cfg.devft.similarity == "weights":
            return weight_similarity(self.full, self.base.family)
        return hidden_similarity(
            self.full, self.base.family, self.calibration, self.cfg.train.precision
        )

    def base_similarity(self) -> np.ndarray:
        """(L, L) layer similarity of the base model itself (the initial LoRA has B = 0);
        computed once per process."""
        if self._base_similarity is None:
            current = self.lora
            self.lora = self.initial_lora
            try:
                self._base_similarity = self.similarity().numpy()
            finally:
                self.lora = current
        return self._base_similarity

    def group_and_frozen(self, k: int) -> tuple[Groups, tuple[int, ...]]:
        """The k groups of a stage and its frozen (emulator) submodel layers."""
        return method_groups(self.method, self.cfg, self.depth, k, self._similarity_array)

    def _similarity_array(self):  # called by the spectral recipe only
        return self.similarity().numpy()

    def plan_stage(self, stage: Stage) -> tuple[StagePlan, StateDict]:
        """The stage's plan (groups, fusion) and its submodel's initial LoRA.

        Also fills `stage_report` with what explains the stage's start: both adapters' norms,
        the fusion cross term, the groups that got a fresh init and those whose β was clamped,
        and the β and residual exponent fused with (None when every group is one layer).
        """
        groups, frozen = self.group_and_frozen(stage.num_layers)
        plan = StagePlan(stage.index, tuple(tuple(g) for g in groups), self.cfg.devft.beta,
                         self.method.fusion, frozen)
        log.info("stage %d: %d layers, groups %s", stage.index, stage.num_layers,
                 format_groups(groups))
        calibration: dict[str, Any] = {}
        if self.method.calibrate and not plan.is_full(self.depth):
            start = time.perf_counter()
            grid = fusion_grid(self.cfg.calibrate.betas, self.cfg.calibrate.residual_exponents)
            best, tried = pick_best(grid, lambda p: self._start_calib_loss(replace(plan, **p)))
            plan = replace(plan, **best)
            calibration = {"calibrated_beta": plan.beta, "calibrated_residual": plan.residual,
                           "calibration_grid": tried,
                           "calibration_time_s": round(time.perf_counter() - start, 3)}
            log.info("stage %d: calibrated beta %g, residual exponent %g (%s)", stage.index,
                     plan.beta, plan.residual, ", ".join(
                         f"{t['beta']:g}/{t['residual']:g}: {t['calib_loss']:.3f}" for t in tried))
        sub, fresh = self.initial_adapter(plan)
        fuses = any(len(g) > 1 for g in groups)  # β and γ act on groups of 2+ layers only
        self.stage_report = {
            **stage_start_report(self.lora, sub, groups, plan.beta, plan.fusion, self.prefix,
                                 self.cfg.lora.r),
            "fresh_init_groups": fresh,
            "clamped_groups": clamped_groups(groups, plan.beta, plan.fusion),
            "beta": plan.beta if fuses else None,
            "residual_exponent": plan.residual if fuses else None,
            "frozen_layers": list(frozen),
            "start_calib_loss": self.calib_submodel(plan, sub),
            **calibration,
        }
        return plan, drop_layers(sub, frozen, self.prefix)

    def _start_calib_loss(self, plan: StagePlan) -> float:
        """The plan's submodel, with its initial adapter, on the calibration rows."""
        return self.calib_submodel(plan, self.initial_adapter(plan)[0])

    def initial_adapter(self, plan: StagePlan) -> tuple[StateDict, list[int]]:
        """The plan's submodel adapter fused from the global one (frozen layers included)."""
        return initial_submodel_adapter(
            self.lora, self.initial_lora, plan.group_lists(), plan.beta, plan.fusion,
            self.prefix, untrained=self.method.untrained_init, seed=self.cfg.seed,
            stage=plan.stage)

    def adapter_norms(self, sub_lora: StateDict | None = None) -> dict[str, Any]:
        """Per-layer ‖A‖, ‖B‖ stats of the full model's LoRA (and of a submodel's)."""
        out = {"full": adapter_norms(self.lora, self.prefix, self.cfg.lora.r)}
        if sub_lora is not None:
            out["submodel"] = adapter_norms(sub_lora, self.prefix, self.cfg.lora.r)
        return out

    def absorb(self, plan: StagePlan, sub_lora: StateDict) -> None:
        """Transfer the submodel's aggregated LoRA into the full model's global LoRA."""
        variant = plan.transfer_for(self.method.transfer, self.depth)
        groups = transfer_groups(plan.group_lists(), plan.frozen)
        self.lora = transfer_state(sub_lora, groups, variant, self.prefix, into=self.lora)

    # ---- evaluation ------------------------------------------------------------------------
    def eval_full(self) -> float:
        """Held-out loss of the full model with the current global LoRA."""
        set_lora_state(self.full, self.lora)
        loss, self.eval_by_category = heldout_losses(
            self.full, self.eval_batches, self.eval_categories, self.cfg.train.precision)
        return loss

    def eval_submodel(self, plan: StagePlan, sub_lora: StateDict) -> float:
        """Held-out loss of the stage submodel itself with its aggregated LoRA."""
        model = self._loaded_submodel(plan, sub_lora)
        return heldout_loss(model, self.eval_batches, self.cfg.train.precision)

    def calib_submodel(self, plan: StagePlan, sub_lora: StateDict) -> float:
        """Loss of the stage submodel with `sub_lora` on the calibration rows (never the
        evaluation rows)."""
        model = self._loaded_submodel(plan, sub_lora)
        return heldout_loss(model, [self.calibration], self.cfg.train.precision)

    def _loaded_submodel(self, plan: StagePlan, sub_lora: StateDict):
        """The plan's submodel with `sub_lora` loaded; frozen layers get B = 0."""
        model = stage_model(self.base, plan, self.cfg.lora, self.cfg.model.quantization)
        if plan.frozen:
            sub_lora = fill_frozen(sub_lora, get_lora_state(model), plan.frozen, self.prefix)
        set_lora_state(model, sub_lora)
        return model

    def save_adapter(self, path: Path) -> None:
        """The full model's global LoRA in PEFT format (safetensors + adapter_config.json)."""
        set_lora_state(self.full, self.lora)
        self.full.save_pretrained(str(path), safe_serialization=True)
