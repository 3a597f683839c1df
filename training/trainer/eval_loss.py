"""The eval loss finetune.py reports is the held-out loss evaluate.py reports for the same rows.

Both are the total NLL of every labelled (assistant) token of the validation rows, cut at train.max_length, divided
by the number of those tokens (training.evaluation.heldout.heldout_loss): one pool over all rows, as training pools
the tokens of a batch. transformers' Trainer instead averages each eval batch's mean, weighted by its rows, so a
batch of short rows counts as much as a batch of long ones and the figure moves with per_device_eval_batch_size.

Under DDP every rank adds up its own batches and the totals are summed; the few rows accelerate repeats to even out
the last batch across ranks are counted twice (Trainer drops them).
"""
from __future__ import annotations

import torch
from transformers import Trainer

from training.chat_format import IGNORE_INDEX


class PooledEvalLossTrainer(Trainer):
    """Trainer whose `eval_loss` is pooled over the labelled tokens of the whole evaluation set."""

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self.eval_totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)  # summed NLL, tokens
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        totals = self.accelerator.reduce(self.eval_totals, reduction="sum")
        key = f"{metric_key_prefix}_loss"
        if key in output.metrics and totals[1] > 0:
            output.metrics[key] = (totals[0] / totals[1]).item()
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not (prediction_loss_only and "labels" in inputs and self.model_accepts_loss_kwargs):
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            if loss is not None and "labels" in inputs:  # a mean over this batch's tokens: its sum is mean x count
                n = self.label_count(inputs).to(self.eval_totals.device)
                self.eval_totals += torch.stack([loss.detach().double() * n, n])
            return loss, logits, labels
        inputs = self._prepare_inputs(inputs)
        extra = {"skip_logits": True} if self.args.use_liger_kernel else {}
        with torch.no_grad(), self.compute_loss_context_manager():
            # transformers' causal-LM loss is its summed NLL / num_items_in_batch: 1 gives the sum itself.
            nll = model(**inputs, num_items_in_batch=1, **extra).loss.detach().double()
        n = self.label_count(inputs).to(nll.device)
        self.eval_totals += torch.stack([nll, n])
        return (nll / n.clamp(min=1)).float(), None, None

    @staticmethod
    def label_count(inputs) -> torch.Tensor:
        """Predicted tokens: labels after the shift every causal-LM loss makes (or the collator's shift_labels)."""
        shifted = inputs["shift_labels"] if "shift_labels" in inputs else inputs["labels"][..., 1:]
        return (shifted != IGNORE_INDEX).sum().double()
