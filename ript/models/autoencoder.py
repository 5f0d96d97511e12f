"""SkillVAE: the QueST action autoencoder (spec §3).

A chunk of T actions is encoded by a causal conv + causal transformer stack into n = T/F latent
vectors, quantised by FSQ (or VQ, ablation only) into n discrete "skill tokens", and decoded back
to T actions by a transformer decoder whose queries are fixed sinusoidal positions.

Quantisers come from ``vector_quantize_pytorch``; nothing here re-implements them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vector_quantize_pytorch import FSQ, VectorQuantize

# Requested codebook size -> FSQ levels, used when ``fsq_levels`` is None (spec §3.1).
FSQ_LEVELS: dict[int, list[int]] = {
    16: [5, 3],
    64: [8, 8],
    256: [8, 6, 5],
    512: [8, 8, 8],
    1024: [8, 5, 5, 5],
    2048: [8, 8, 6, 5],
    4096: [7, 5, 5, 5, 5],
}


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """Fixed positional table ``(length, dim)``: interleaved sin/cos, frequencies 10000^(-2i/d).

    Column 2i holds sin(p * w_i) and column 2i+1 cos(p * w_i) (spec §3.2 step 3).
    """
    if dim % 2:
        raise ValueError(f"dim must be even for a sinusoidal table, got {dim}")
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


def causal_mask(length: int, device=None) -> Tensor:
    """Float additive mask ``(L, L)``: -inf strictly above the diagonal (future positions)."""
    return torch.triu(torch.full((length, length), float("-inf"), device=device), diagonal=1)


class CausalConv1d(nn.Module):
    """Conv1d whose output i sees only inputs <= its right edge (spec §3.2 step 2).

    Left-padding by k-1 is equivalent to the original "pad both sides, drop the trailing outputs":
    output i covers inputs [s*i - (k-1), s*i], and length L -> ceil(L / s).
    """

    def __init__(self, channels: int, kernel: int, stride: int):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(channels, channels, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, L) -> (B, C, ceil(L/s))
        return self.conv(F.pad(x, (self.pad, 0)))


class CausalGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics at step t use only steps <= t: (B, C, L) -> (B, C, L).

    Plain ``nn.GroupNorm`` on a (B, C, L) sequence averages over all L steps, so an early output
    depends on later actions, which breaks the causality spec §3.2 states (and §9 item 12
    tests). Here mean/variance of each channel group are running (cumulative) statistics over
    time. Same parameters as GroupNorm. On a toy task it trained as well as the plain form,
    while per-step normalisation over 4-channel groups trained much worse.
    """

    def forward(self, x: Tensor) -> Tensor:
        b, c, length = x.shape
        g = self.num_groups
        xg = x.float().view(b, g, c // g, length)
        count = torch.arange(1, length + 1, device=x.device, dtype=xg.dtype) * (c // g)
        mean = xg.sum(2).cumsum(-1) / count                                   # (B, G, L)
        var = ((xg * xg).sum(2).cumsum(-1) / count - mean * mean).clamp_min(0.0)
        y = (xg - mean[:, :, None]) * torch.rsqrt(var[:, :, None] + self.eps)
        y = y.view(b, c, length).to(x.dtype)
        return y * self.weight[None, :, None] + self.bias[None, :, None]


class SkillEncoder(nn.Module):
    """Encoder phi: actions (B, T, A) -> pre-quantisation latents (B, n, d) (spec §3.2)."""

    def __init__(self, action_dim, chunk_size, downsample, d_model, layers, heads, ffn, dropout,
                 strict_causal=True):
        super().__init__()
        self.n_tokens = chunk_size // downsample
        self.action_proj = nn.Linear(action_dim, d_model)
        n_down = int(math.log2(downsample))
        # log2(F) stride-2 layers then one stride-1 layer; first kernel 5, the rest 3.
        strides = [2] * n_down + [1]
        kernels = [5] + [3] * n_down
        norm = CausalGroupNorm if strict_causal else nn.GroupNorm
        self.convs = nn.Sequential(*[
            nn.Sequential(CausalConv1d(d_model, k, s), norm(8, d_model), nn.Mish())
            for k, s in zip(kernels, strides)
        ])
        self.register_buffer("pos", sinusoidal_table(self.n_tokens, d_model), persistent=False)
        self.register_buffer("mask", causal_mask(self.n_tokens), persistent=False)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, ffn, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(
            layer, layers, norm=None, enable_nested_tensor=False
        )

    def forward(self, actions: Tensor) -> Tensor:
        x = self.action_proj(actions)                       # (B, T, d)
        x = self.convs(x.transpose(1, 2)).transpose(1, 2)   # (B, n, d)
        x = x + self.pos[: x.shape[1]]
        x = self.transformer(x, mask=self.mask, is_causal=True)
        return x[:, -self.n_tokens:]                        # keep the last n positions


class SkillDecoder(nn.Module):
    """Decoder psi: code tokens (B, n, d) -> actions (B, T, A) (spec §3.4).

    Queries carry no content: they are the fixed sinusoidal table for positions 0..T-1.
    """

    def __init__(self, action_dim, chunk_size, d_model, layers, heads, ffn, dropout):
        super().__init__()
        self.register_buffer("queries", sinusoidal_table(chunk_size, d_model), persistent=False)
        self.register_buffer("mask", causal_mask(chunk_size), persistent=False)
        layer = nn.TransformerDecoderLayer(
            d_model, heads, ffn, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerDecoder(layer, layers, norm=None)
        self.head = nn.Linear(d_model, action_dim)

    def forward(self, codes: Tensor) -> Tensor:
        q = self.queries.unsqueeze(0).expand(codes.shape[0], -1, -1)
        x = self.transformer(q, codes, tgt_mask=self.mask, tgt_is_causal=True)
        return self.head(x)


class SkillVAE(nn.Module):
    """Action chunk autoencoder with a discrete bottleneck (spec §3).

    ``strict_causal`` (default True; config key ``autoencoder.causal_norm``) uses running
    GroupNorm statistics in the conv stack so that token j depends only on actions 0..F*j; False
    uses GroupNorm over the whole chunk like the original (QueST's ``Conv1dBlock``), which lets
    every used action influence every token (see ``CausalGroupNorm``).

    ``commitment_weight`` and ``codebook_dim`` only matter for the VQ ablation; QueST left the
    library's commitment weight (1.0) and projected to a 512-d codebook.

    Submodule names matter: ``encoder`` and ``quantizer`` are frozen in stage 2, ``decoder`` is
    not (spec §4.5); the policy selects parameters by these prefixes.
    """

    def __init__(
        self,
        action_dim: int,
        chunk_size: int = 32,
        downsample: int = 4,
        d_model: int = 256,
        enc_layers: int = 2,
        dec_layers: int = 4,
        heads: int = 4,
        ffn: int = 1024,
        dropout: float = 0.1,
        quantizer: str = "fsq",
        codebook_size: int = 1024,
        fsq_levels: list[int] | None = None,
        commitment_weight: float = 0.25,
        strict_causal: bool = True,
        codebook_dim: int | None = None,
    ):
        super().__init__()
        if downsample < 2 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 2, got {downsample}")
        if chunk_size % downsample:
            raise ValueError(
                f"chunk_size ({chunk_size}) must be divisible by downsample ({downsample})"
            )
        if d_model % 8 or d_model % heads:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by 8 (GroupNorm) and by heads ({heads})"
            )
        if quantizer not in ("fsq", "vq"):
            raise ValueError(f"quantizer must be 'fsq' or 'vq', got {quantizer!r}")
        if quantizer == "fsq" and fsq_levels is None:
            if codebook_size not in FSQ_LEVELS:
                raise ValueError(
                    f"codebook_size {codebook_size} has no FSQ level preset "
                    f"(known: {sorted(FSQ_LEVELS)}); pass fsq_levels explicitly"
                )
            fsq_levels = list(FSQ_LEVELS[codebook_size])
        self.arch = {
            "action_dim": action_dim, "chunk_size": chunk_size, "downsample": downsample,
            "d_model": d_model, "enc_layers": enc_layers, "dec_layers": dec_layers,
            "heads": heads, "ffn": ffn, "dropout": dropout, "quantizer": quantizer,
            "codebook_size": codebook_size,
            "fsq_levels": list(fsq_levels) if fsq_levels is not None else None,
            "commitment_weight": commitment_weight, "strict_causal": strict_causal,
            "codebook_dim": codebook_dim,
        }
        self.action_dim = action_dim
        self.chunk_size = chunk_size
        self.quantizer_type = quantizer
        self.encoder = SkillEncoder(
            action_dim, chunk_size, downsample, d_model, enc_layers, heads, ffn, dropout,
            strict_causal,
        )
        if quantizer == "fsq":
            self.quantizer = FSQ(list(fsq_levels), dim=d_model)
            self._vocab = int(math.prod(fsq_levels))
        else:
            # codebook_dim None: codes live in d_model (no projection); QueST used 512 (§3.1).
            self.quantizer = VectorQuantize(
                dim=d_model, codebook_size=codebook_size, commitment_weight=commitment_weight,
                codebook_dim=codebook_dim,
            )
            self._vocab = int(codebook_size)
        self.decoder = SkillDecoder(action_dim, chunk_size, d_model, dec_layers, heads, ffn,
                                    dropout)

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens: prod(levels) for FSQ, codebook_size for VQ (spec §3.1)."""
        return self._vocab

    @property
    def n_tokens(self) -> int:
        """Tokens per chunk, n = T / F."""
        return self.encoder.n_tokens

    def encode(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """actions (B, T, A) -> codes (B, n, d), indices (B, n) long, aux_loss scalar.

        ``aux_loss`` is 0 for FSQ (no codebook, spec §3.3) and the commitment loss for VQ.
        """
        if actions.shape[1:] != (self.chunk_size, self.action_dim):
            raise ValueError(
                f"actions must be (B, {self.chunk_size}, {self.action_dim}), "
                f"got {tuple(actions.shape)}"
            )
        z = self.encoder(actions)
        if self.quantizer_type == "fsq":
            codes, indices = self.quantizer(z)
            aux = z.new_zeros(())
        else:
            codes, indices, aux = self.quantizer(z)
            aux = aux.sum()
        return codes, indices.long(), aux

    def decode_codes(self, codes: Tensor) -> Tensor:
        """codes (B, n, d) -> actions (B, T, A)."""
        return self.decoder(codes)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (B, n) -> decoder memory (B, n, d) via the library's inverse map + projection."""
        if self.quantizer_type == "fsq":
            return self.quantizer.indices_to_codes(indices)
        return self.quantizer.get_output_from_indices(indices)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """indices (B, n) long -> actions (B, T, A)."""
        return self.decode_codes(self.indices_to_codes(indices))

    def forward(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """actions (B, T, A) -> (recon (B, T, A), indices (B, n), aux_loss)."""
        codes, indices, aux = self.encode(actions)
        return self.decode_codes(codes), indices, aux

    def loss(self, actions: Tensor, pad_mask: Tensor | None = None) -> tuple[Tensor, dict]:
        """Stage-0 objective (spec §3.5): mean L1 reconstruction (+ VQ commitment).

        ``pad_mask`` (B, T) bool, True = real step, restricts the L1 to real steps; None averages
        over all T steps, padded repeats of the last action included, as the original (§3.2).
        Metrics: loss, recon_l1, aux_loss, codebook_usage (fraction of the vocabulary used in the
        batch, "pp"), codebook_usage_sample (mean fraction of distinct codes per sequence).
        """
        recon, indices, aux = self(actions)
        recon_l1 = masked_l1(recon, actions, pad_mask)
        total = recon_l1 + aux
        metrics = {
            "loss": total.item(),
            "recon_l1": recon_l1.item(),
            "aux_loss": aux.item(),
            **codebook_metrics(indices, self.vocab_size),
        }
        return total, metrics


def masked_l1(pred: Tensor, target: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """Element-wise L1 mean over (B, T, A); with ``pad_mask`` (B, T) only over real steps.

    Without a mask a window near a demo's end weights its padded repeats of the last action like
    real steps (the original's ``L1Loss``, spec §3.5); with it each real step counts once.
    """
    err = (pred - target).abs()
    if pad_mask is None:
        return err.mean()
    m = pad_mask.to(err.dtype).unsqueeze(-1).expand_as(err)
    # clamp avoids 0/0 when a batch is all padding; the loss is then exactly 0.
    return (err * m).sum() / m.sum().clamp_min(1.0)


def codebook_metrics(indices: Tensor, vocab_size: int) -> dict[str, float]:
    """Code-usage diagnostics for indices (B, n) (spec §3.3 "pp" and "pp_sample")."""
    used = torch.unique(indices).numel() / vocab_size
    srt = indices.sort(dim=1).values
    distinct = 1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1)
    return {
        "codebook_usage": float(used),
        "codebook_usage_sample": (distinct.float() / indices.shape[1]).mean().item(),
    }
