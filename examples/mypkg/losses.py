"""``task.loss=mypkg.losses.focal``: a loss is ``(model, batch) -> (loss_sum, count)``.

``batch`` is a dict with ``"x"`` (this rank's rows of the step's batch) and
``"y"`` (their labels). Return the *summed* loss as a 0-d tensor and the
number of rows it sums over: shoal scales the gradient by the global batch
so that workers with unequal shares still add up to the global-batch mean,
and reports ``sum(loss_sum) / sum(count)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def focal(
    model: nn.Module, batch: dict[str, torch.Tensor], gamma: float = 2.0
) -> tuple[torch.Tensor, int]:
    """Focal loss (Lin et al., 2017): cross-entropy down-weighted by ``(1 - p_true) ** gamma``."""
    logits = model(batch["x"]).float()
    y = batch["y"]
    log_p = F.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)
    loss = -((1.0 - log_p.exp()) ** gamma) * log_p
    return loss.sum(), len(y)
