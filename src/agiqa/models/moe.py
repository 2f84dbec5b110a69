"""The mixture-of-experts fusion head of MA-AGIQA (Wang et al., ACM MM 2024).

P semantic experts (one per prompt, ``Dropout(ReLU(Linear(D, N)))``) and one image expert
(``Linear(N, N)`` on the MANIQA key) are mixed by a plain linear gate over their concatenation
(no softmax, as in the official code); a linear layer turns the mixture into the score.

With the gates fixed at the values computed, the score is linear in the image expert's input
(the MANIQA key, one value per patch), so it splits exactly into one additive term per patch
plus a remainder (the semantic experts and the biases): :meth:`MoEHead.patch_contributions`.

Ablations (not in the paper, off by default): ``prompts`` keeps the semantic experts of some
prompts only (the head still takes the vectors of every prompt and reads those), ``image``
drops the image expert, and ``fusion`` replaces the gate: ``concat`` feeds the concatenated
experts to the output layer (``Linear(E·N, 1)``), ``mean`` averages the experts' scores (the
output layer applied to each expert, which is the mixture with every gate at 1/E). The
defaults build the paper's head, module for module and in the same order (so the same seed
draws the same weights).
"""

from __future__ import annotations

import torch
from torch import nn

from agiqa.models.noise import Dropout

__all__ = ["FUSIONS", "MoEHead"]

FUSIONS = ("moe", "concat", "mean")


class MoEHead(nn.Module):
    def __init__(self, num_prompts: int = 2, semantic_dim: int = 4096, width: int = 784,
                 drop: float = 0.1, prompts: list[int] | None = None, image: bool = True,
                 fusion: str = "moe"):
        super().__init__()
        self.num_prompts = num_prompts
        self.prompt_index = list(range(num_prompts)) if prompts is None else list(prompts)
        if any(not 0 <= i < num_prompts for i in self.prompt_index) or \
                len(set(self.prompt_index)) != len(self.prompt_index):
            raise ValueError(f"prompt experts {self.prompt_index} must be distinct indices of "
                             f"the {num_prompts} prompts")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
        n_experts = len(self.prompt_index) + int(image)
        if n_experts == 0:
            raise ValueError("the head needs at least one expert")
        self.fusion = fusion
        self.semantic_experts = nn.ModuleList(
            nn.Sequential(nn.Linear(semantic_dim, width), nn.ReLU(), Dropout(drop))
            for _ in self.prompt_index
        )
        self.image_expert = nn.Linear(width, width) if image else None
        self.gating = nn.Linear(width * n_experts, n_experts) if fusion == "moe" else None
        self.output = nn.Linear(width * n_experts if fusion == "concat" else width, 1)

    def forward(self, key: torch.Tensor, semantics: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """key [B, N], semantics [B, P, D] → scores [B], gates [B, P+1] (image expert last).

        The gates are the weight each expert enters the score with: the gate's output (moe),
        1/E (mean) or 1 (concat); 0 for the experts an ablation leaves out."""
        if semantics.ndim != 3 or semantics.shape[1] != self.num_prompts:
            raise ValueError(
                f"semantics must have shape [B, {self.num_prompts}, D], got {list(semantics.shape)}"
            )
        semantics = semantics.to(key.dtype)
        experts = [e(semantics[:, i]) for i, e in zip(self.prompt_index, self.semantic_experts,
                                                      strict=True)]
        if self.image_expert is not None:
            experts.append(self.image_expert(key))
        stacked = torch.stack(experts, dim=1)  # [B, E, N]
        if self.fusion == "moe":
            used = self.gating(stacked.flatten(1))
            score = self.output((used.unsqueeze(-1) * stacked).sum(1)).squeeze(-1)
        elif self.fusion == "mean":
            used = stacked.new_full(stacked.shape[:2], 1.0 / stacked.shape[1])
            score = self.output(stacked).squeeze(-1).mean(1)
        else:
            used = stacked.new_ones(stacked.shape[:2])
            score = self.output(stacked.flatten(1)).squeeze(-1)
        if self.prompt_index == list(range(self.num_prompts)) and self.image_expert is not None:
            return score, used
        slot = {c: j for j, c in enumerate(self.prompt_index)}
        if self.image_expert is not None:
            slot[self.num_prompts] = len(self.prompt_index)
        zero = used.new_zeros(used.shape[0])
        gates = torch.stack([used[:, slot[c]] if c in slot else zero
                             for c in range(self.num_prompts + 1)], dim=1)
        return score, gates

    def patch_contributions(self, key: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Each patch's additive share of the score through the image expert, [B, N].

        ``score = contributions.sum(1) + remainder`` exactly, where the remainder is
        ``output.bias + Σ_i g_i·(output·e_i) + g_image·(output·image_expert.bias)`` and the
        gates are those of :meth:`forward` on the same inputs (zero without an image expert).
        """
        if self.image_expert is None:
            return torch.zeros_like(key)
        w = self.output.weight[0]
        if self.fusion == "concat":  # the output layer's block that reads the image expert
            w = w[-self.image_expert.out_features:]
        u = w @ self.image_expert.weight  # [N]: d score / d key at g = 1
        return gates[:, -1:].to(key.dtype) * u * key
