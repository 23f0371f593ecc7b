"""PRIOR's building blocks (spec: shared/specs/PRIOR.md; "Supp" = the PRIOR supplement).

Attention pools (Supp §2.2), word-to-sentence pooling, the local alignment module (LAM, spec §3.2),
the sentence prototype memory bank (SPB, §4) with its Gumbel temperature schedule, and the two
decoders of cross-modality conditional reconstruction (CCR, §5). Sentence tensors are batched and
padded, (B, T, D) with a (B, T) mask; every block masks the padding, so results equal the public
code's one-report-at-a-time loops on the real sentences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unimed.models.prior_config import (
    BANK_EVAL_MODES,
    GUMBEL_SCHEDULES,
    PROTOTYPE_INITS,
    WORD_POOLINGS,
)


class QueryAttentionPool(nn.Module):
    """CLIP-style attention pooling: the mean token queries [mean; tokens] (Supp §2.2; spec §2).

    Used for the global image feature (over the 7x7 grid, with a learned positional embedding,
    ``num_positions`` = grid cells) and for the global report (over its sentences, no positional
    embedding: ``num_positions=0``). ``nn.MultiheadAttention`` holds the q/k/v projections and the
    output projection (CLIP's c_proj); :meth:`forward` computes what its forward does for the one
    query without projecting every token (see there).
    """

    def __init__(self, dim: int, heads: int, out_dim: int | None = None,
                 num_positions: int = 0) -> None:
        super().__init__()
        self.pos = (
            nn.Parameter(torch.randn(num_positions + 1, dim) / math.sqrt(dim))
            if num_positions else None
        )
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.proj = nn.Identity() if out_dim is None else nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, dim) tokens, optional (B, N) bool mask of real tokens -> (B, out_dim).

        ``self.attn(x[:, :1], x, x)`` with x = [mean; tokens], reassociated for a single query:
        head h's score of token n is (q_h W_k,h) . x_n (the key bias adds the same q_h . b_k,h to
        every score, which the softmax removes), and its output is (sum_n a_hn x_n) W_v,h^T + b_v,h
        (the weights sum to 1). Each head pools the (1 + N) width-`dim` tokens once instead of
        every token being projected to keys and values: about 4x faster forward and backward for
        the image pool of a 1,280-wide EfficientNet on a 3 x 3 grid, 6x on 7 x 7; equal to
        ``nn.MultiheadAttention`` up to float rounding.
        """
        if mask is None:
            mean = tokens.mean(1, keepdim=True)  # (B, 1, dim)
        else:
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            mean = (tokens * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
        x = torch.cat([mean, tokens], dim=1)  # (B, 1 + N, dim)
        if self.pos is not None:
            x = x + self.pos.to(x.dtype)
        attn = self.attn
        batch, _, dim = x.shape
        per_head = (attn.num_heads, attn.head_dim, dim)
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, _, b_v = attn.in_proj_bias.chunk(3)
        query = F.linear(x[:, 0], w_q, b_q).view(batch, *per_head[:2]) * attn.head_dim ** -0.5
        scores = torch.einsum("bhf,bnf->bhn", torch.einsum("bhe,hef->bhf", query, w_k.view(per_head)), x)
        if mask is not None:
            keep = torch.cat([mask.new_ones(batch, 1), mask], dim=1).bool()
            scores = scores.masked_fill(~keep.unsqueeze(1), float("-inf"))
        pooled = torch.einsum("bhn,bnf->bhf", scores.softmax(-1), x)  # (B, heads, dim)
        out = torch.einsum("bhf,hef->bhe", pooled, w_v.view(per_head)).reshape(batch, dim) + b_v
        return self.proj(attn.out_proj(out))


def sentence_masks(sentence_index: torch.Tensor) -> torch.Tensor:
    """(B, L) per-token sentence id (0-based, -1 for [CLS], [SEP], padding) -> (B, T, L) bool,
    entry [b, t, l] true when token l belongs to sentence t. T = the batch's largest count."""
    count = int(sentence_index.max().item()) + 1 if sentence_index.numel() else 0
    ids = torch.arange(max(count, 1), device=sentence_index.device)
    return sentence_index.unsqueeze(1) == ids.view(1, -1, 1)


class WordPool(nn.Module):
    """Words -> sentence vectors, one per sentence id (spec §2, "word -> sentence pooling").

    "mean" (the released code): the mean of the sentence's token vectors. "attention" (Supp §2.2
    "self-attention pooling", the code's unused ``AttentionPool``): token i of a sentence S scores
    e_i = (W_q x_i) . sum_{j in S} (W_k x_j), with q, k of width dim / 8; the sentence is
    sum_i softmax_S(e)_i x_i.
    """

    def __init__(self, dim: int, pooling: str) -> None:
        super().__init__()
        if pooling not in WORD_POOLINGS:
            raise ValueError(f"word pooling must be one of {', '.join(WORD_POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        if pooling == "attention":
            self.query = nn.Linear(dim, max(dim // 8, 1))
            self.key = nn.Linear(dim, max(dim // 8, 1))

    def forward(self, tokens: torch.Tensor, sentence_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) token vectors, (B, L) sentence ids -> ((B, T, D) sentences, (B, T) mask)."""
        member = sentence_masks(sentence_index)  # (B, T, L)
        present = member.any(-1)  # (B, T)
        weights = member.to(tokens.dtype)
        if self.pooling == "mean":
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1)
        else:
            key_sum = weights @ self.key(tokens)  # (B, T, M)
            energy = key_sum @ self.query(tokens).transpose(1, 2)  # (B, T, L)
            energy = energy.masked_fill(~member, torch.finfo(energy.dtype).min)
            weights = torch.softmax(energy, dim=-1) * weights  # an empty sentence row -> 0
        return weights @ tokens, present


class LocalAlignment(nn.Module):
    """LAM (Supp §2.3, spec §3.2): single-head cross-attention with *sigmoid* weights, both ways.

    A_sv = sigmoid(q_t(s) k_i(v)^T / sqrt(D)) (T, P) and s_hat = A_sv v_i(v) (T, D): sentences read
    from the patches; A_vs = sigmoid(q_i(v) k_t(s)^T / sqrt(D)) (P, T) and v_hat = A_vs v_t(s)
    (P, D): patches rebuilt from the sentences. The weights are not normalised, so both are sums;
    padded sentences get weight 0. No output projection, no residual.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim ** -0.5
        self.q_img, self.k_img, self.v_img = (nn.Linear(dim, dim) for _ in range(3))
        self.q_txt, self.k_txt, self.v_txt = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, patches: torch.Tensor, sentences: torch.Tensor,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, P, D) patches, (B, T, D) sentences, (B, T) mask -> "attended_sentences" s_hat
        (B, T, D), "sentence_attention" A_sv (B, T, P), "reconstructed_patches" v_hat (B, P, D),
        "patch_attention" A_vs (B, P, T)."""
        a_sv = torch.sigmoid(self.q_txt(sentences) @ self.k_img(patches).transpose(1, 2) * self.scale)
        a_vs = torch.sigmoid(self.q_img(patches) @ self.k_txt(sentences).transpose(1, 2) * self.scale)
        if mask is not None:
            a_vs = a_vs * mask.unsqueeze(1).to(a_vs.dtype)
        return {
            "attended_sentences": a_sv @ self.v_img(patches),
            "sentence_attention": a_sv,
            "reconstructed_patches": a_vs @ self.v_txt(sentences),
            "patch_attention": a_vs,
        }

    def mean_attention(self, patches: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
        """(N, P, D) patches of N images, (C, D) one sentence each of C texts -> (N, C)
        ½[mean_P A_sv + mean_P A_vs]: PRIOR's local zero-shot score (spec §7)."""
        a_sv = torch.einsum("cd,npd->ncp", self.q_txt(sentences), self.k_img(patches))
        a_vs = torch.einsum("npd,cd->ncp", self.q_img(patches), self.k_txt(sentences))
        return (torch.sigmoid(a_sv * self.scale).mean(-1) + torch.sigmoid(a_vs * self.scale).mean(-1)) / 2


def gumbel_temperature(step: int, total_steps: int, schedule: str, start: float = 0.9,
                       end: float = 0.01) -> float:
    """The SPB's Gumbel-softmax temperature at `step` of the `total_steps` of stages 2-3 (spec §4.4).

    "fixed": `start` throughout (the released code, 0.9). "exp": start * (end / start)^(t/T), the
    Supp's 0.9 -> 0.01 with the defaults. "linear": start + (end - start) t/T. With ``end=0.09`` the
    last two are the code's unused "exp" and "linear". Steps past `total_steps` keep the end value.
    """
    if schedule not in GUMBEL_SCHEDULES:
        raise ValueError(f"gumbel schedule must be one of {', '.join(GUMBEL_SCHEDULES)}, got {schedule!r}")
    if schedule == "fixed":
        return start
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    if schedule == "exp":
        return start * (end / start) ** t
    return start + (end - start) * t


class SentencePrototypeBank(nn.Module):
    """SPB (Supp §2.3, spec §4): K learned prototypes that replace each sentence vector.

    Query: logits = x E^T, y = Gumbel-softmax(logits, tau) (soft), out = y E. At evaluation there is
    no noise: y = softmax(logits / tau) (``eval_mode="softmax"``) or the one-hot argmax. The bank
    starts N(0, 1) as in the code (``init="l1"``: each prototype also L1-normalised, as the Supp
    says; its entries are then ~1/D and the bank maps every sentence to nearly the same vector);
    it learns by gradient only. `temperature` is a buffer, so it is checkpointed; the
    training loop sets it each step from :func:`gumbel_temperature`.
    """

    def __init__(self, num_prototypes: int, dim: int, *, init: str = "gaussian",
                 temperature: float = 0.9, eval_mode: str = "softmax") -> None:
        super().__init__()
        if init not in PROTOTYPE_INITS:
            raise ValueError(f"prototype init must be one of {', '.join(PROTOTYPE_INITS)}, got {init!r}")
        if eval_mode not in BANK_EVAL_MODES:
            raise ValueError(f"bank eval mode must be one of {', '.join(BANK_EVAL_MODES)}, got {eval_mode!r}")
        weight = torch.randn(num_prototypes, dim)
        if init == "l1":
            weight = F.normalize(weight, p=1, dim=-1)
        self.prototypes = nn.Parameter(weight)  # (K, D)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.eval_mode = eval_mode

    def set_temperature(self, value: float) -> None:
        """Set the Gumbel-softmax temperature (must be > 0)."""
        if value <= 0:
            raise ValueError(f"Gumbel temperature must be > 0, got {value}")
        self.temperature.fill_(value)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, K) raw dot products with the prototypes."""
        return x @ self.prototypes.T

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, D) sentence vectors -> "prototype_sentences" (N, D), "bank_logits" (N, K),
        "assignment" (N,) argmax of the (noisy, in training) weights. Computed in float32 with
        autocast off: the temperature anneals to 0.01, and (logits + noise) / tau overflows fp16."""
        with torch.autocast(x.device.type, enabled=False):
            logits = self.logits(x.float())
            tau = float(self.temperature)
            if self.training:
                weights = F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
            elif self.eval_mode == "softmax":
                weights = torch.softmax(logits / tau, dim=-1)
            else:
                weights = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
            return {
                "prototype_sentences": weights @ self.prototypes,
                "bank_logits": logits,
                "assignment": weights.argmax(-1),
            }


class DecoderBlock(nn.Module):
    """Nearest upsampling to `size`, then two (Conv3x3 -> ReLU -> BN) (Supp §2.3's order)."""

    def __init__(self, in_channels: int, out_channels: int, size: int) -> None:
        super().__init__()
        self.size = size
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [nn.Conv2d(c_in, out_channels, 3, padding=1), nn.ReLU(inplace=True),
                       nn.BatchNorm2d(out_channels)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) -> (B, C_out, size, size)."""
        return self.body(F.interpolate(x, size=(self.size, self.size), mode="nearest"))


class ImageDecoder(nn.Module):
    """CCR image branch (spec §5.1): [Dropout2d(v); v_hat] (2D channels) -> 5 blocks -> 1 channel.

    Channel dropout on the patch map is the "masking"; v_hat is the sentence-conditioned map from
    LAM. Each block doubles the grid (the last lands on `image_size`) and halves the channels
    (2D -> D -> ... -> 2D/32); a Conv3x3 head with no activation gives the image.
    """

    def __init__(self, dim: int, grid: int, image_size: int, *, blocks: int = 5,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.grid = grid
        self.drop = nn.Dropout2d(dropout)
        channels = [2 * dim // 2**k for k in range(blocks + 1)]
        sizes = [grid * 2 ** (k + 1) for k in range(blocks - 1)] + [image_size]
        self.blocks = nn.Sequential(*(
            DecoderBlock(channels[k], channels[k + 1], sizes[k]) for k in range(blocks)
        ))
        self.head = nn.Conv2d(channels[-1], 1, 3, padding=1)

    def forward(self, patches: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
        """(B, P, D) patch tokens and (B, P, D) v_hat, P = grid^2 -> (B, 1, S, S)."""
        x = torch.cat([self.drop(self.to_map(patches)), self.to_map(reconstructed)], dim=1)
        return self.head(self.blocks(x))

    def to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, D) row-major tokens -> (B, D, grid, grid), the inverse of flatten(2).transpose."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, self.grid, self.grid)


class ReportDecoder(nn.Module):
    """CCR report branch (spec §5.2): Q learned queries cross-attend to the patch tokens and
    become Q predicted sentence prototypes.

    A post-norm Transformer decoder (BERT's layer shape: self-attention, cross-attention, GELU
    feed-forward of 4D) over LayerNorm(queries); `layers` 6 and non-causal self-attention follow
    the Supp ("non-autoregressive"); ``causal=True`` gives the released code's effective causal
    mask (its 8 layers are ``layers=8``).
    """

    def __init__(self, dim: int, *, layers: int = 6, heads: int = 12, queries: int = 16,
                 causal: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, queries, dim))
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                           batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.causal = causal

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, D) patch tokens -> (B, Q, D) predictions."""
        x = self.drop(self.norm(self.queries.expand(patches.shape[0], -1, -1)))
        q = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(q, device=x.device, dtype=x.dtype) \
            if self.causal else None
        return self.decoder(x, patches, tgt_mask=mask, tgt_is_causal=self.causal)
