"""The one LightningModule every method trains through: L = L_LM + Σ weighted auxiliary losses (eq. 17)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn
from torchmetrics.text import Perplexity
from transformers import get_scheduler

from dsmoe.cli import StepFailed
from dsmoe.data.datamodule import IGNORE_INDEX
from dsmoe.distributed import clean_name, clip_grad_norm, is_fsdp
from dsmoe.method import Method
from dsmoe.stats import param_counts


@dataclass
class OptimConfig:
    """AdamW with warmup and a decaying schedule (paper: lr 2e-5)."""

    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: str = "cosine"  # any transformers.get_scheduler name: cosine, linear, constant_with_warmup, ...


class TokenPerplexity(Perplexity):
    """torchmetrics' Perplexity (Σ NLL and token count, summed over processes) with each token's NLL from a
    log-softmax (cross-entropy), eq. 2: torchmetrics takes log(softmax(x)), infinite for a token whose probability
    underflows fp32 (NLL above ~103, as a damaged or freshly pruned model gives)."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        flat = target.reshape(-1)
        ignore = -100 if self.ignore_index is None else self.ignore_index  # cross-entropy's default: no class is -100
        nll = nn.functional.cross_entropy(
            preds.reshape(-1, preds.shape[-1]).float(), flat, ignore_index=ignore, reduction="sum"
        )
        self.total_log_probs += nll
        self.count += (flat != ignore).sum()


class NonFiniteLossError(StepFailed):
    """The loss stopped being finite (e.g. a learning rate far too high); training stops."""


def fp32_buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, value) of every fp32 buffer of the model's rotary embeddings (what 16-bit casts must spare)."""
    return [
        (module, name, buffer.detach().clone())
        for module in model.modules()
        if type(module).__name__.endswith("RotaryEmbedding")
        for name, buffer in module.named_buffers(recurse=False)
        if buffer.dtype == torch.float32
    ]


def steps_to_host(optimizer: torch.optim.Optimizer) -> None:
    """Keep AdamW's step counts on the CPU, where a fresh run has them. A sharded FSDP checkpoint restores them on
    the process group's device (the GPU), and AdamW (neither capturable nor fused) then reads each one to the host
    twice per parameter per optimizer step."""
    if optimizer.defaults.get("capturable") or optimizer.defaults.get("fused"):
        return  # these keep them on the parameters' device by design
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.device.type != "cpu":
            state["step"] = step.cpu()


class LitCausalLM(L.LightningModule):
    """Wraps a transformed causal LM (DSMoE, a baseline, or dense) for continued pre-training.

    Logs train/{lm_loss, <aux>_loss, loss, grad_norm}, on the steps that reach the logger also train/{
    mean_active_experts, active_experts/layer_XX, activated_params_frac}, and per validation source val/ppl_<source>
    plus val/ppl (token-weighted) and val activation stats (summed over all processes). Built before the Trainer
    wraps the model (DDP, FSDP): parameter counts and optimizer groups are taken from the unsharded model here.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        optim: OptimConfig,
        dense_params: int,
        val_source_names: list[str] | None = None,
        clip_norm: float | None = 1.0,
    ) -> None:
        super().__init__()
        self.model, self.method, self.optim = model, method, optim
        self.model.train()  # loaders return eval-mode models; Lightning keeps the modes it is given
        self.dense_params = dense_params
        self.clip_norm = clip_norm
        self.param_counts = param_counts(model)
        # methods whose activation is not dynamic: fixed once the method is applied (masks, pruned shapes, k of n)
        self.static_activated_params = None if method.dynamic else method.activated_params(model)
        # weight decay on matrices only; names decided here because FSDP flattens parameters to 1-D shards
        self.no_decay = {name for name, p in model.named_parameters() if p.ndim < 2 or "norm" in name}
        self.val_source_names = list(val_source_names or ["val"])
        self.val_ppl = nn.ModuleList(TokenPerplexity(ignore_index=IGNORE_INDEX) for _ in self.val_source_names)
        self.fp32_buffers = fp32_buffers(model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, labels=labels, use_cache=False)  # no KV cache: nothing decodes

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        lm_loss = self(batch["input_ids"], labels=batch["labels"]).loss
        aux = self.method.aux_losses(self.model)
        loss = lm_loss + sum(aux.values(), torch.zeros((), device=lm_loss.device))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss at step {self.global_step} (lm={lm_loss.item()}, "
                f"aux={ {k: v.item() for k, v in aux.items()} }); stopping"
            )
        self.log("train/lm_loss", lm_loss, prog_bar=True)
        for name, value in aux.items():
            self.log(f"train/{name}_loss", value)
        self.log("train/loss", loss)
        if self._step_is_logged():
            self._log_activation("train", last=True)
        return loss

    def _step_is_logged(self) -> bool:
        """Whether this optimizer step's values reach the logger (Lightning writes every log_every_n_steps steps)
        or the last progress line. Only then are the activation statistics taken: a host read and a ``self.log``
        per layer, after the loss check has waited for the forward pass, would idle the GPU at every step."""
        trainer = self._trainer
        if trainer is None:
            return True
        step = self.global_step + 1
        return step % trainer.log_every_n_steps == 0 or step >= trainer.max_steps > 0

    def _log_activation(self, stage: str, last: bool) -> None:
        """Mean active experts (overall, per layer) and activated params / dense params. In training this process's
        last batch; in validation every batch of every process."""
        if self.method.dynamic:
            stats = self.method.dynamic.stats(self.model, last, self.param_counts)
            self.log(f"{stage}/mean_active_experts", stats.mean_active, prog_bar=stage == "train")
            for i, value in enumerate(stats.mean_active_per_layer):
                self.log(f"{stage}/active_experts/layer_{i:02d}", value)
            activated = stats.activated_params
        else:
            activated = self.static_activated_params
        self.log(f"{stage}/activated_params_frac", activated / self.dense_params)

    def on_fit_start(self) -> None:
        """Under bf16-true Lightning casts the whole module, buffers too: RoPE's inv_freq would be rounded
        (up to ~1 rad of angle at position 1024 for Llama-2-7B). Its fp32 values are put back. So are the perplexity
        sums' (torchmetrics lets ``Module.to`` cast its states): a bf16 token count stops being exact past 256 tokens."""
        for module, name, value in self.fp32_buffers:
            current = getattr(module, name)
            if current.dtype != torch.float32:
                setattr(module, name, value.to(current.device))
        for metric in self.val_ppl:
            metric.set_dtype(torch.float32)

    def on_train_start(self) -> None:
        if self.method.on_train_start is not None:  # e.g. SparseGPT takes its (possibly sharded) masks
            self.method.on_train_start(self.model)
        for optimizer in self.trainer.optimizers:
            steps_to_host(optimizer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the global gradient norm to ``clip_norm`` (FSDP: through FSDP's own clip on the root module)."""
        if self.clip_norm is None:
            return
        if is_fsdp(self.trainer.strategy.model):
            norm = clip_grad_norm(self.trainer.strategy.model, self.clip_norm)
            self.log("train/grad_norm", norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=self.clip_norm, gradient_clip_algorithm="norm")

    def on_before_optimizer_step(self, optimizer) -> None:
        """Before clipping: e.g. SparseGPT zeroes the pruned weights' gradients."""
        if self.method.before_optimizer_step is not None:
            self.method.before_optimizer_step(self.model)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.method.after_optimizer_step is not None:  # e.g. SparseGPT re-zeroes pruned weights
            self.method.after_optimizer_step(self.model)

    def on_validation_epoch_start(self) -> None:
        if self.method.dynamic:
            self.method.dynamic.reset(self.model)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Perplexity and activation counts over the real windows (a rank's last batch may hold filler ones)."""
        labels = batch["labels"]
        dynamic = self.method.dynamic
        if dynamic is not None:  # every batch (asking whether it holds fillers would sync with the device)
            dynamic.count_only(self.model, labels != IGNORE_INDEX)
        try:
            logits = self(batch["input_ids"]).logits[:, :-1].float()
        finally:
            if dynamic is not None:
                dynamic.count_only(self.model, None)
        self.val_ppl[dataloader_idx].update(logits, labels[:, 1:])

    def on_validation_epoch_end(self) -> None:
        """val/ppl_<source> per source and val/ppl = exp(Σ NLL / Σ tokens) over all of them (token-weighted)."""
        nll, tokens = 0.0, 0.0
        for name, metric in zip(self.val_source_names, self.val_ppl, strict=True):
            with metric.sync_context():  # the sums over all processes (every rank joins: some may hold only fillers)
                source_nll, source_tokens = float(metric.total_log_probs), float(metric.count)
            if source_tokens > 0:
                self.log(f"val/ppl_{name}", math.exp(source_nll / source_tokens), add_dataloader_idx=False)
                nll, tokens = nll + source_nll, tokens + source_tokens
            metric.reset()
        if tokens:
            self.log("val/ppl", math.exp(nll / tokens), prog_bar=True)
        if self.method.dynamic:  # the counts of every process
            self.method.dynamic.all_reduce(self.model)
        self._log_activation("val", last=False)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if clean_name(name) in self.no_decay else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas))
        total = self.trainer.estimated_stepping_batches  # the Trainer's max_steps: the data are an IterableDataset
        if not math.isfinite(total):
            raise ValueError(
                "the LR schedule needs the Trainer's max_steps (derived from max_tokens in the train config)"
            )
        scheduler = get_scheduler(self.optim.schedule, optimizer, self.optim.warmup_steps, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
