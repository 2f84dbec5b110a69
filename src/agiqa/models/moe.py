"""The mixture-of-experts fusion head of MA-AGIQA (Wang et al., ACM MM 2024).

P semantic experts (one per prompt, ``Dropout(ReLU(Linear(D, N)))``) and one image expert
(``Linear(N, N)`` on the MANIQA key) are mixed by a plain linear gate over their concatenation
(no softmax, as in the official code); a linear layer turns the mixture into the score.

With the gates fixed at the values computed, the score is linear in the image expert's input
(the MANIQA key, one value per patch), so it splits exactly into one additive term per patch
plus a remainder (the semantic experts and the biases): :meth:`MoEHead.patch_contributions`.
"""

from __future__ import annotations

import torch
from torch import nn

from agiqa.models.noise import Dropout

__all__ = ["MoEHead"]


class MoEHead(nn.Module):
    def __init__(self, num_prompts: int = 2, semantic_dim: int = 4096, width: int = 784,
                 drop: float = 0.1):
        super().__init__()
        self.num_prompts = num_prompts
        self.semantic_experts = nn.ModuleList(
            nn.Sequential(nn.Linear(semantic_dim, width), nn.ReLU(), Dropout(drop))
            for _ in range(num_prompts)
        )
        self.image_expert = nn.Linear(width, width)
        self.gating = nn.Linear(width * (num_prompts + 1), num_prompts + 1)
        self.output = nn.Linear(width, 1)

    def forward(self, key: torch.Tensor, semantics: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """key [B, N], semantics [B, P, D] → scores [B], gates [B, P+1] (image expert last)."""
        if semantics.ndim != 3 or semantics.shape[1] != self.num_prompts:
            raise ValueError(
                f"semantics must have shape [B, {self.num_prompts}, D], got {list(semantics.shape)}"
            )
        semantics = semantics.to(key.dtype)
        experts = [e(semantics[:, i]) for i, e in enumerate(self.semantic_experts)]
        experts.append(self.image_expert(key))
        stacked = torch.stack(experts, dim=1)  # [B, P+1, N]
        gates = self.gating(stacked.flatten(1))
        mixed = (gates.unsqueeze(-1) * stacked).sum(1)
        return self.output(mixed).squeeze(-1), gates

    def patch_contributions(self, key: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Each patch's additive share of the score through the image expert, [B, N].

        ``score = contributions.sum(1) + remainder`` exactly, where the remainder is
        ``output.bias + Σ_i g_i·(output·e_i) + g_image·(output·image_expert.bias)`` and the
        gates are those of :meth:`forward` on the same inputs.
        """
        u = self.output.weight[0] @ self.image_expert.weight  # [N]: d score / d key at g = 1
        return gates[:, -1:].to(key.dtype) * u * key
