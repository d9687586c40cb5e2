"""The LightningModule that trains any model kind with the objectives of Table 3.

Optimisation is manual (Lightning's ``manual_backward``; precision, DDP gradient reduction and
checkpointing stay Lightning's) because a step whose loss or gradient is not finite must be skipped
before Adam sees it: Adam's moments would otherwise carry the NaN into every later update. Skipped
steps are counted and do not advance ``global_step``; ``max_consecutive_skips`` in a row stop the
run with a ``PathanatError``, leaving the checkpoints already written untouched.

The reparameterisation noise of a step is drawn after reseeding the global generator with
(seed, batch number, rank), so a resumed run draws exactly the noise an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from pathanat.config import to_dict
from pathanat.errors import PathanatError
from pathanat.experiment import ExperimentConfig
from pathanat.metrics import psnr
from pathanat.models import HierarchicalVAE, HVAEOutput, objectives
from pathanat.runs import CHECKPOINT_KEY
from pathanat.training.data import STEP, derived_seed

# A latent unit is active when the variance over the batch of its posterior mean exceeds this
# (Burda et al. 2016).
ACTIVE_UNIT_THRESHOLD = 0.01


def active_units(out: HVAEOutput) -> Tensor:
    """Fraction of active units per group (L+1,): units whose posterior mean varies over the batch
    with variance above ``ACTIVE_UNIT_THRESHOLD``."""
    return torch.stack(
        [
            (g.posterior.mu.detach().float().var(0) > ACTIVE_UNIT_THRESHOLD).float().mean()
            for g in out.groups
        ]
    )


def batch_psnr(x: Tensor, reconstruction: Tensor, brain: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-slice PSNR (dB, each slice's own range) over the slice and inside its brain mask (NaN
    where the mask is empty)."""
    ref = x.detach().float().cpu().numpy()[:, 0]
    rec = reconstruction.detach().float().cpu().numpy()[:, 0]
    whole = psnr(ref, rec)
    inside = np.full(len(ref), np.nan)
    if brain is not None:
        mask = brain.detach().cpu().numpy()[:, 0] > 0.5
        keep = mask.any(axis=(1, 2))
        if keep.any():
            inside[keep] = psnr(ref[keep], rec[keep], mask=mask[keep])
    return torch.from_numpy(whole), torch.from_numpy(inside)


class HVAEModule(pl.LightningModule):
    """Trains ``HierarchicalVAE(config.model)`` with ``config.objective`` and ``config.optim``."""

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__()
        self.config = config
        self.model = HierarchicalVAE(config.model)
        self.channels_last = config.trainer.use_channels_last  # asked once, not every step
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.automatic_optimization = False
        self.batches_seen = 0  # batches drawn, skipped ones included: the data stream's position
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._val: dict[str, list[Tensor]] = {}
        self.val_grid: tuple[Tensor, Tensor] | None = None  # inputs, reconstructions

    # ---- optimisation ------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.model.parameters(), lr=self.config.optim.lr,
            weight_decay=self.config.optim.weight_decay,
        )

    def _input(self, batch: dict) -> Tensor:
        x = batch["image"]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _loss(
        self, out: HVAEOutput, x: Tensor, batch: dict, beta: float
    ) -> tuple[objectives.ELBOTerms, objectives.Loss]:
        terms = objectives.elbo_terms(out, x, self.config.model.kind)
        supervised = self.config.model.supervised
        return terms, objectives.training_loss(
            terms,
            objectives.group_sizes(out),
            beta,
            balance=self.config.objective.kl_balance,
            seg_logits=out.seg_logits if supervised else None,
            mask=batch["lesion"] if supervised else None,
            supervision_weight=self.config.objective.supervision_weight,
            kl_scale=self.config.objective.kl_scales(self.config.model.num_groups),
        )

    def kl_weight(self) -> float:
        objective = self.config.objective
        return objectives.kl_weight(self.global_step, objective.kl_cycle, objective.kl_start)

    def learning_rate(self) -> float:
        """The lr of the next update (``OptimConfig.learning_rate``)."""
        return self.config.optim.learning_rate(self.global_step, self.config.trainer.max_steps)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        seed = derived_seed(STEP, self.config.trainer.seed, self.batches_seen, self.global_rank)
        torch.manual_seed(seed)
        self.batches_seen += 1
        optimizer = self.optimizers()
        x = self._input(batch)
        out = self.model(x)
        beta, lr = self.kl_weight(), self.learning_rate()
        terms, loss = self._loss(out, x, batch, beta)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss.loss)
        # The norm before clipping; a non-finite norm means a non-finite gradient somewhere.
        clip = self.config.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip is not None else math.inf
        )
        bad = (~torch.isfinite(loss.loss.detach()) | ~torch.isfinite(grad_norm)).float()
        if self.trainer.world_size > 1:  # every replica must take the same decision
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item() > 0:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.config.trainer.max_consecutive_skips:
                raise PathanatError(
                    f"training stopped at step {self.global_step}: {self.consecutive_skips} steps "
                    "in a row had a non-finite loss or gradient (trainer.max_consecutive_skips); "
                    "the last checkpoint holds the last good weights. Lower optim.lr or set "
                    "optim.grad_clip."
                )
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            self._check_finite_weights(lr)
            self.consecutive_skips = 0
        self._log_training(out, terms, loss, beta, lr, grad_norm)

    def _check_finite_weights(self, lr: float) -> None:
        """Stop before a non-finite weight is used or saved (a finite gradient and lr <= 1 should
        never make one; if something does, the last checkpoint still holds good weights)."""
        finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()])
        if not bool(finite.all()):
            raise PathanatError(
                f"training stopped at step {self.global_step}: the update with lr {lr:g} made "
                "weights non-finite; the last checkpoint holds the last good weights. Lower "
                "optim.lr or set optim.grad_clip."
            )

    def _log_training(
        self,
        out: HVAEOutput,
        terms: objectives.ELBOTerms,
        loss: objectives.Loss,
        beta: float,
        lr: float,
        grad_norm: Tensor,
    ) -> None:
        metrics = {
            "train/loss": loss.loss.detach(),
            "train/nll_per_dim": loss.nll_per_dim,
            "train/kl_per_dim": loss.kl_per_dim,
            "train/kl_weight": self.config.objective.kl_scale * beta,
            "train/lr": lr,
            "train/grad_norm": grad_norm.detach(),
            "train/skipped_steps": float(self.skipped_steps),
        }
        kl = terms.kl.detach().mean(0)
        units = active_units(out)
        for level in range(kl.shape[0]):
            metrics[f"kl/group_{level}"] = kl[level]
            metrics[f"balance/group_{level}"] = loss.coefficients[level].detach()
            metrics[f"active_units/group_{level}"] = units[level]
        if terms.kl_extra is not None:
            metrics["train/kl_extra"] = terms.kl_extra.detach().sum(1).mean()
        if self.config.model.supervised:
            metrics["train/supervision"] = loss.supervision
        self.log_dict(metrics, prog_bar=False)
        self.log("loss", loss.loss.detach(), prog_bar=True, logger=False)

    # ---- validation --------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val = {"psnr": [], "psnr_brain": [], "elbo_per_dim": []}
        self.val_grid = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self._input(batch)
        out = self.model(x)
        terms = objectives.elbo_terms(out, x, self.config.model.kind)
        reconstruction = self.model.reconstruct(x)
        whole, inside = batch_psnr(x, reconstruction, batch.get("brain"))
        self._val["psnr"].append(whole)
        self._val["psnr_brain"].append(inside)
        self._val["elbo_per_dim"].append(terms.elbo.detach().float().cpu() / terms.dims)
        if batch_idx == 0:
            self.val_grid = (x[:8].float().cpu(), reconstruction[:8].float().cpu())

    def on_validation_epoch_end(self) -> None:
        values = {k: torch.cat(v) for k, v in self._val.items() if v}
        if not values:
            return
        inside = values["psnr_brain"]
        metrics = {
            "val/psnr": values["psnr"].mean(),
            "val/elbo_per_dim": values["elbo_per_dim"].mean(),
        }
        if torch.isfinite(inside).any():
            metrics["val/psnr_brain"] = inside[torch.isfinite(inside)].mean()
        # every replica validates the whole split; sync_dist averages their (near-equal) values
        self.log_dict({k: v.float() for k, v in metrics.items()}, sync_dist=True)

    # ---- checkpoint contents: plain types only, so torch.load(weights_only=True) reads them ----

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "config": to_dict(self.config),
            "batches_seen": self.batches_seen,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint[CHECKPOINT_KEY]
        self.batches_seen = int(state["batches_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skips = int(state["consecutive_skips"])
