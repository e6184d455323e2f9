"""The upstream modules, re-implemented as the pinned conventions (docs/converting.md) describe them, with their
original state-dict layout.

These are the yardsticks of every parity test and of the converters' verify step: they are deliberately
plain (`torch.nn.TransformerDecoder`, a full re-computation per generated token, as the upstream card's
`generate` does) and must not be "improved".
"""

from collections import OrderedDict

import torch
from torch import nn


def transformer_decoder(
    d_model: int, nhead: int, num_layers: int, dim_feedforward: int, dropout: float, activation: str, final_norm: bool
) -> nn.TransformerDecoder:
    """The pinned upstream decoder: PyTorch's own pre-norm `TransformerDecoder` (and so its state-dict keys)."""
    layer = nn.TransformerDecoderLayer(
        d_model=d_model,
        nhead=nhead,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        activation=activation,
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerDecoder(layer, num_layers=num_layers, norm=nn.LayerNorm(d_model) if final_norm else None)


def decode(head: nn.Module, input_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Logits of `head.decoder` over learned positions 0..T-1 with a causal mask, attending to `memory`."""
    length = input_ids.shape[1]
    x = head.tok_emb(input_ids) + head.pos_emb(torch.arange(length, device=input_ids.device))
    causal = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device)
    return head.lm_head(head.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True))


def greedy_answers(
    logits_of, prompt_ids: torch.Tensor, bos_id: int, eos_id: int, max_new_tokens: int
) -> list[list[int]]:
    """The upstream loop: append bos, re-run the whole sequence per token, stop each sample at eos."""
    batch = prompt_ids.shape[0]
    bos = torch.full((batch, 1), bos_id, dtype=torch.long, device=prompt_ids.device)
    ids = torch.cat([prompt_ids, bos], dim=1)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    answers: list[list[int]] = [[] for _ in range(batch)]
    for _ in range(max_new_tokens):
        next_ids = logits_of(ids)[:, -1].argmax(-1)
        for i in range(batch):
            if not finished[i] and next_ids[i].item() != eos_id:
                answers[i].append(next_ids[i].item())
        finished |= next_ids == eos_id
        if finished.all():
            break
        ids = torch.cat([ids, next_ids.unsqueeze(1)], dim=1)
    return answers


class DiffVQAHead(nn.Module):
    """`lapvqa.diffvqa.model.DiffVQAHead`."""

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
        self.decoder = transformer_decoder(d_model, nhead, num_layers, dim_feedforward, dropout, activation, final_norm)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def memory(self, curr_vis: torch.Tensor, ref_vis: torch.Tensor) -> torch.Tensor:
        batch = curr_vis.shape[0]
        ref_frame = self.frame_emb(torch.zeros(batch, 1, dtype=torch.long, device=curr_vis.device))
        curr_frame = self.frame_emb(torch.ones(batch, 1, dtype=torch.long, device=curr_vis.device))
        return torch.cat([self.vis_proj(ref_vis) + ref_frame, self.vis_proj(curr_vis) + curr_frame], dim=1)

    def forward(self, curr_vis: torch.Tensor, ref_vis: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return decode(self, input_ids, self.memory(curr_vis, ref_vis))

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
        return greedy_answers(lambda ids: self(curr_vis, ref_vis, ids), prompt_ids, bos_id, eos_id, max_new_tokens)


class VQAHead(nn.Module):
    """`lapvqa.vqa.model.VQAHead`: DiffVQAHead with one image, no `frame_emb`, 150 positions
    and `tok_emb` tied to `lm_head`."""

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
        max_len: int = 150,
        final_norm: bool = True,
        tie_weights: bool = True,
    ):
        super().__init__()
        self.vis_proj = nn.Linear(vis_dim, d_model)
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.decoder = transformer_decoder(d_model, nhead, num_layers, dim_feedforward, dropout, activation, final_norm)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, vis: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return decode(self, input_ids, self.vis_proj(vis))

    @torch.no_grad()
    def generate(
        self, vis: torch.Tensor, prompt_ids: torch.Tensor, bos_id: int, eos_id: int, max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy answers, one list of ids per sample, without the prompt, bos or eos."""
        return greedy_answers(lambda ids: self(vis, ids), prompt_ids, bos_id, eos_id, max_new_tokens)


class ReportGenerationHead(nn.Module):
    """`ReportGenerationHead` of `lapvqa-rrg` / `lapvqa-rrg-native` as pinned (docs/converting.md): `VQAHead` without
    the question, built as `ReportGenerationHead(vis_dim, d_model, num_layers, nhead)`. A report is
    `[bos] + report_ids + [eos]`; generation starts from `[bos]`. `lm_head` is tied where the file's tensors are."""

    def __init__(
        self,
        vis_dim: int,
        d_model: int = 512,
        num_layers: int = 6,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        vocab_size: int = 50257,
        max_len: int = 256,
        final_norm: bool = True,
        tie_weights: bool = False,
    ):
        super().__init__()
        self.vis_proj = nn.Linear(vis_dim, d_model)
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.decoder = transformer_decoder(d_model, nhead, num_layers, dim_feedforward, dropout, activation, final_norm)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, vis: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return decode(self, input_ids, self.vis_proj(vis))

    @torch.no_grad()
    def generate(self, vis: torch.Tensor, bos_id: int, eos_id: int, max_new_tokens: int) -> list[list[int]]:
        """Greedy reports from `[bos]`, one list of ids per image, without bos or eos."""
        start = torch.empty(vis.shape[0], 0, dtype=torch.long, device=vis.device)
        return greedy_answers(lambda ids: self(vis, ids), start, bos_id, eos_id, max_new_tokens)


class TimmAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(batch, length, dim))


class TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """The captioning model's ViT-L/14 in timm's `VisionTransformer` key layout.

    Returns the patch tokens after the final norm, CLS dropped: `[B, grid², dim]`.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.patch_embed = TimmPatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, embed_dim))
        self.blocks = nn.Sequential(*[TimmBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, CLS first: `[B, 1 + grid², dim]`."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images)[:, 1:]


class CaptioningModel(nn.Module):
    """`lapvqa.pretrain.model.CaptioningModel`: ViT encoder + report decoder."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        vision_width: int = 1024,
        vision_depth: int = 24,
        vision_heads: int = 16,
        d_model: int = 512,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        vocab_size: int = 50257,
        max_len: int = 256,
        final_norm: bool = True,
        tie_weights: bool = False,
    ):
        super().__init__()
        self.vision_encoder = VisionTransformer(img_size, patch_size, 3, vision_width, vision_depth, vision_heads)
        self.vis_proj = nn.Linear(vision_width, d_model)
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.decoder = transformer_decoder(d_model, nhead, num_layers, dim_feedforward, dropout, activation, final_norm)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return decode(self, input_ids, self.vis_proj(self.vision_encoder(images)))

    @torch.no_grad()
    def generate(self, images: torch.Tensor, bos_id: int, eos_id: int, max_new_tokens: int) -> list[list[int]]:
        """Greedy reports from `[bos]`, one list of ids per image, without bos or eos."""
        memory = self.vis_proj(self.vision_encoder(images))
        start = torch.empty(images.shape[0], 0, dtype=torch.long, device=images.device)
        return greedy_answers(lambda ids: decode(self, ids, memory), start, bos_id, eos_id, max_new_tokens)


class OpenClipResidualAttentionBlock(nn.Module):
    """open_clip's `ResidualAttentionBlock`: pre-norm `nn.MultiheadAttention` and a GELU MLP (`c_fc`, `c_proj`)."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(), c_proj=nn.Linear(mlp_width, width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.resblocks = nn.ModuleList([OpenClipResidualAttentionBlock(width, heads, mlp_width) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class OpenClipAttentionalPooler(nn.Module):
    """open_clip's `AttentionalPooler`: learned queries cross-attend (`kdim = vdim = context width`)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class CocaVisionTower(nn.Module):
    """open_clip's `VisionTransformer` as `coca_ViT-L-14` builds it (`attentional_pool=True`, `pool_type="tok"`,
    `output_tokens=True`), with its state-dict keys (the `visual.*` part of an open_clip CoCa checkpoint).

    Returns `(image_embedding, tokens)`: the first pooled query projected, and the other pooled queries.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 14,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        output_dim: int = 768,
        attn_pooler_queries: int = 256,
        attn_pooler_heads: int = 8,
    ):
        super().__init__()
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = OpenClipTransformer(width, layers, heads, int(width * mlp_ratio))
        self.attn_pool = OpenClipAttentionalPooler(output_dim, width, attn_pooler_heads, attn_pooler_queries)
        self.ln_post = nn.LayerNorm(output_dim)
        self.proj = nn.Parameter(scale * torch.randn(output_dim, output_dim))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(images).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))
        return x[:, 0] @ self.proj, x[:, 1:]


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Fills every parameter with seeded noise (norm weights around 1), so parity checks exercise all of them.

    Used to make upstream-layout checkpoints with random weights for tests, benchmarks and dry runs.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator) * std
        owner = name.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in name else ""
        is_norm_weight = ("norm" in owner or owner.startswith("ln_")) and name.endswith("weight")
        parameter.copy_(noise + 1.0 if is_norm_weight else noise)
    return module


class DetectionHead(nn.Module):
    """`lapvqa.detection.model.DetectionHead`: DETR-style abnormality detection on VinDr-CXR.

    Known (card): `vis_proj` Linear(vis_dim -> d_model), 2 pre-norm encoder layers, `object_queries` [1, 20, d_model],
    3 decoder layers, `class_head` Linear(d_model -> 14 + 1), `box_head` MLP(d_model -> d_model -> 4) + sigmoid.
    Pinned (card silent): PyTorch's own `TransformerEncoder` / `TransformerDecoder` (8 heads, ReLU, dropout 0.1,
    LayerNorm eps 1e-5, batch_first) with the decoder pre-norm like the encoder; the object queries are the decoder's
    input, expanded over the batch; no positional encoding of the visual tokens or the queries; the no-object class
    is the last index of `class_head` (DETR's convention); `box_head` is `Sequential(Linear, ReLU, Linear)`; boxes are
    (cx, cy, w, h) in [0, 1]. The FFN widths (`dim_feedforward`, and `decoder_dim_feedforward` if the decoder's
    differs) and the final `encoder.norm` / `decoder.norm` are read from the weights.
    """

    def __init__(
        self,
        vis_dim: int,
        d_model: int = 256,
        nhead: int = 8,
        num_enc: int = 2,
        num_dec: int = 3,
        num_queries: int = 20,
        num_classes: int = 14,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        decoder_norm_first: bool = True,
        decoder_dim_feedforward: int | None = None,
        encoder_final_norm: bool = True,
        decoder_final_norm: bool = True,
    ):
        super().__init__()
        layer_options = dict(
            d_model=d_model, nhead=nhead, dropout=dropout, activation=activation, layer_norm_eps=layer_norm_eps
        )
        self.vis_proj = nn.Linear(vis_dim, d_model)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(
                **layer_options, dim_feedforward=dim_feedforward, batch_first=True, norm_first=True
            ),
            num_layers=num_enc,
            norm=nn.LayerNorm(d_model, eps=layer_norm_eps) if encoder_final_norm else None,
            enable_nested_tensor=False,
        )
        self.object_queries = nn.Parameter(torch.zeros(1, num_queries, d_model))
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(
                **layer_options,
                dim_feedforward=decoder_dim_feedforward or dim_feedforward,
                batch_first=True,
                norm_first=decoder_norm_first,
            ),
            num_layers=num_dec,
            norm=nn.LayerNorm(d_model, eps=layer_norm_eps) if decoder_final_norm else None,
        )
        self.class_head = nn.Linear(d_model, num_classes + 1)
        self.box_head = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, 4))

    def forward(self, vis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`vis` [B, N, vis_dim] -> class logits [B, num_queries, num_classes + 1], boxes [B, num_queries, 4]."""
        memory = self.encoder(self.vis_proj(vis))
        hidden = self.decoder(self.object_queries.expand(vis.shape[0], -1, -1), memory)
        return self.class_head(hidden), self.box_head(hidden).sigmoid()


class VisualGroundingHead(nn.Module):
    """`VisualGroundingHead` of `lapvqa-pg` as pinned (docs/converting.md): TransVG-style phrase grounding.

    `vis_proj` Linear(vis_dim -> d_model), `txt_proj` Linear(txt_dim -> d_model), `reg_token` [1, 1, d_model]; the
    sequence `[reg_token ; vis_proj(vis) ; txt_proj(txt)]` (plus the first 1 + N + 1 rows of `pos_emb` [1, max_len,
    d_model] where the file has it) passes PyTorch's pre-norm `TransformerEncoder` (8 heads, ReLU, dropout 0.1,
    LayerNorm eps 1e-5, batch_first; the FFN width and the final `encoder.norm` read from the weights); `box_head`
    `Sequential(Linear, ReLU, Linear)` + sigmoid at the REG position gives (cx, cy, w, h) in [0, 1].
    """

    def __init__(
        self,
        vis_dim: int,
        txt_dim: int,
        d_model: int = 256,
        nhead: int = 8,
        num_layers: int = 3,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        final_norm: bool = True,
        max_len: int | None = None,
    ):
        super().__init__()
        self.vis_proj = nn.Linear(vis_dim, d_model)
        self.txt_proj = nn.Linear(txt_dim, d_model)
        self.reg_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.register_parameter("pos_emb", nn.Parameter(torch.zeros(1, max_len, d_model)) if max_len else None)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer,
            num_layers,
            norm=nn.LayerNorm(d_model, eps=layer_norm_eps) if final_norm else None,
            enable_nested_tensor=False,
        )
        self.box_head = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, 4))

    def forward(self, vis: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """`vis` [B, N, vis_dim] and the phrase features `txt` [B, txt_dim] -> boxes [B, 4]."""
        reg = self.reg_token.expand(vis.shape[0], -1, -1)
        x = torch.cat([reg, self.vis_proj(vis), self.txt_proj(txt).unsqueeze(1)], dim=1)
        if self.pos_emb is not None:
            x = x + self.pos_emb[:, : x.shape[1]]
        return self.box_head(self.encoder(x)[:, 0]).sigmoid()


class ContrastiveTextEncoder(nn.Module):
    """The two-tower models' text encoder as pinned: token + learned positions 0..T-1, PyTorch's pre-norm
    `TransformerEncoder` (bidirectional, padding masked), optional final norm."""

    def __init__(
        self,
        vocab_size: int = 50257,
        d_model: int = 512,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 2048,
        max_len: int = 77,
        activation: str = "gelu",
        final_norm: bool = True,
    ):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout=0.1, activation=activation, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(d_model) if final_norm else None, enable_nested_tensor=False
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)
        return self.encoder(x, src_key_padding_mask=attention_mask == 0)


class ContrastiveModel(nn.Module):
    """`ContrastiveModel` of `lapvqa-pretrain-contrastive` / `-sigmoid` as pinned: the captioning ViT, the text
    encoder, bias-free projections into a shared space, `logit_scale` (and `logit_bias` for the sigmoid model).

    Image embedding: the normed CLS token (`image_pooling="cls"`) or the mean patch token; text embedding: the final
    hidden state at the eot token, the last non-padding one (`text_pooling="eot"`), or the mean over non-padding.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        vision_width: int = 1024,
        vision_depth: int = 24,
        vision_heads: int = 16,
        vision_mlp_ratio: float = 4.0,
        text_width: int = 512,
        text_heads: int = 8,
        text_depth: int = 6,
        text_ffn: int = 2048,
        text_max_len: int = 77,
        text_activation: str = "gelu",
        text_final_norm: bool = True,
        vocab_size: int = 50257,
        embed_dim: int = 512,
        sigmoid: bool = False,
        image_pooling: str = "cls",
        text_pooling: str = "eot",
    ):
        super().__init__()
        self.image_pooling, self.text_pooling = image_pooling, text_pooling
        self.vision_encoder = VisionTransformer(
            img_size, patch_size, 3, vision_width, vision_depth, vision_heads, vision_mlp_ratio
        )
        self.text_encoder = ContrastiveTextEncoder(
            vocab_size, text_width, text_heads, text_depth, text_ffn, text_max_len, text_activation, text_final_norm
        )
        self.image_proj = nn.Linear(vision_width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if sigmoid else None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_encoder.tokens(images)
        pooled = tokens[:, 0] if self.image_pooling == "cls" else tokens[:, 1:].mean(dim=1)
        return self.image_proj(pooled)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids, attention_mask)
        if self.text_pooling == "eot":
            last = attention_mask.sum(dim=1) - 1  # texts are right-padded: eot is the last real token
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        return self.text_proj(pooled)

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image and text embeddings (L2-normalised), logits per image `[images, texts]`, and the loss of matching
        pairs (row i with row i): SigLIP's pairwise sigmoid with `logit_bias`, CLIP's symmetric cross-entropy
        without."""
        image = nn.functional.normalize(self.encode_image(images), dim=-1)
        text = nn.functional.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        logits = self.logit_scale.exp() * image @ text.T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
            signs = 2 * torch.eye(len(logits), dtype=logits.dtype, device=logits.device) - 1
            loss = -nn.functional.logsigmoid(signs * logits).sum() / len(logits)
        else:
            targets = torch.arange(len(logits), device=logits.device)
            loss = (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)) / 2
        return image, text, logits, loss
