"""The upstream modules, re-implemented as SPEC.md pins them, with their original state-dict layout.

These are the yardsticks of every parity test and of the converters' verify step: they are deliberately
plain (`torch.nn.TransformerDecoder`, a full re-computation per generated token, as the upstream card's
`generate` does) and must not be "improved".
"""

import torch
from torch import nn


class DiffVQAHead(nn.Module):
    """`lapvqa.diffvqa.model.DiffVQAHead` (SPEC.md section 1)."""

    def __init__(
        self,
        vis_dim: int,
        d_model: int = 512,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        vocab_size: int = 50257,
        max_len: int = 200,
        final_norm: bool = True,
        tie_weights: bool = False,
    ):
        super().__init__()
        self.vis_proj = nn.Linear(vis_dim, d_model)
        self.frame_emb = nn.Embedding(2, d_model)
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        layer = nn.TransformerDecoderLayer(
            d_model=d_model,
            nhead=nhead,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation=activation,
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(
            layer, num_layers=num_layers, norm=nn.LayerNorm(d_model) if final_norm else None
        )
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def memory(self, curr_vis: torch.Tensor, ref_vis: torch.Tensor) -> torch.Tensor:
        batch = curr_vis.shape[0]
        ref_frame = self.frame_emb(torch.zeros(batch, 1, dtype=torch.long, device=curr_vis.device))
        curr_frame = self.frame_emb(torch.ones(batch, 1, dtype=torch.long, device=curr_vis.device))
        return torch.cat([self.vis_proj(ref_vis) + ref_frame, self.vis_proj(curr_vis) + curr_frame], dim=1)

    def forward(self, curr_vis: torch.Tensor, ref_vis: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device)
        hidden = self.decoder(x, self.memory(curr_vis, ref_vis), tgt_mask=causal, tgt_is_causal=True)
        return self.lm_head(hidden)

    @torch.no_grad()
    def generate(
        self,
        curr_vis: torch.Tensor,
        ref_vis: torch.Tensor,
        prompt_ids: torch.Tensor,
        bos_id: int,
        eos_id: int,
        max_new_tokens: int,
    ) -> list[list[int]]:
        """Greedy answers, one list of ids per sample, without the prompt, bos or eos."""
        batch = prompt_ids.shape[0]
        bos = torch.full((batch, 1), bos_id, dtype=torch.long, device=prompt_ids.device)
        ids = torch.cat([prompt_ids, bos], dim=1)
        finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
        answers: list[list[int]] = [[] for _ in range(batch)]
        for _ in range(max_new_tokens):
            next_ids = self(curr_vis, ref_vis, ids)[:, -1].argmax(-1)
            for i in range(batch):
                if not finished[i] and next_ids[i].item() != eos_id:
                    answers[i].append(next_ids[i].item())
            finished |= next_ids == eos_id
            if finished.all():
                break
            ids = torch.cat([ids, next_ids.unsqueeze(1)], dim=1)
        return answers


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Fills every parameter with seeded noise (norm weights around 1), so parity checks exercise all of them.

    Used to make upstream-layout checkpoints with random weights for tests, benchmarks and dry runs.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator) * std
        is_norm_weight = "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight")
        parameter.copy_(noise + 1.0 if is_norm_weight else noise)
    return module
