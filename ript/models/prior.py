"""SkillGPT: the autoregressive prior over skill tokens (spec §4.2, §4.4, §5.5).

Sequence: [c_1 (task), c_2 (obs), <s>, z_1, ..., z_{n-1}] -> logits for z_1..z_n at the last n
positions. The transformer is a hand-written pre-LN stack so that sampling can use a KV cache
with exactly the same weights as teacher forcing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ript.models.autoencoder import sinusoidal_table

KVCache = list[tuple[Tensor, Tensor]]  # per layer: keys, values (B, heads, L, d_head)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None = None):
        """x (B, L, d) -> (out (B, L, d), (k, v) including ``past``).

        Without ``past`` the L positions attend causally among themselves. With ``past`` the new
        positions are appended after the cached ones; only L == 1 is needed (one decoding step),
        where the new position may see every cached position, so no mask is required.
        """
        b, length, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, length, self.heads, d // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        if past is not None:
            if length != 1:
                raise ValueError("cached attention supports one new position at a time")
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=past is None,
        )
        y = y.transpose(1, 2).reshape(b, length, d)
        return self.resid_dropout(self.proj(y)), (k, v)


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, past=None):
        a, kv = self.attn(self.ln1(x), past)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class SkillGPT(nn.Module):
    """Causal transformer prior p(z_1..z_n | context) (spec §4.2).

    Token id ``vocab_size`` is the start token <s>. Sinusoidal positions are added to the token
    embeddings only; the causal mask covers all positions, including the context tokens.
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        n_tokens: int = 8,
        d_model: int = 384,
        layers: int = 6,
        heads: int = 6,
        ffn: int = 1536,
        dropout: float = 0.1,
    ):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.arch = {"vocab_size": vocab_size, "n_tokens": n_tokens, "d_model": d_model,
                     "layers": layers, "heads": heads, "ffn": ffn, "dropout": dropout}
        self.vocab_size = vocab_size
        self.n_tokens = n_tokens
        self.d_model = d_model
        self.start_token = vocab_size
        self.tok_emb = nn.Embedding(vocab_size + 1, d_model)
        self.register_buffer("pos", sinusoidal_table(n_tokens, d_model), persistent=False)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d_model, heads, ffn, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # GPT-style small-normal init keeps initial logits near uniform (CE ~ log V at step 0).
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ teacher forcing

    def _embed_tokens(self, tokens: Tensor, start: int) -> Tensor:
        """tokens (B, L) at token positions start..start+L-1 -> (B, L, d) with positions added."""
        return self.tok_emb(tokens) + self.pos[start: start + tokens.shape[1]]

    def _run(self, x: Tensor, cache: KVCache | None = None):
        """Run the stack on x (B, L, d); returns final-LN hidden (B, L, d) and the new cache."""
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.ln_f(x), new_cache

    def _input(self, context: Tensor, tokens: Tensor) -> Tensor:
        """[context, <s>, tokens] embedded, with embedding dropout on the concatenation."""
        start = tokens.new_full((tokens.shape[0], 1), self.start_token)
        tok = self._embed_tokens(torch.cat([start, tokens], dim=1), 0)
        return self.emb_dropout(torch.cat([context, tok], dim=1))

    def logits(self, context: Tensor, tokens: Tensor) -> Tensor:
        """context (B, C, d) (C = 2), tokens (B, n) long -> logits (B, n, V) predicting tokens."""
        if tokens.shape[1] != self.n_tokens:
            raise ValueError(f"expected {self.n_tokens} tokens, got {tokens.shape[1]}")
        h, _ = self._run(self._input(context, tokens[:, :-1]))
        return self.head(h[:, -self.n_tokens:])

    def log_prob(self, context: Tensor, tokens: Tensor, top_k: int | None = None,
                 temperature: float = 1.0) -> Tensor:
        """log p(z_i | context, z_<i) of the given tokens, (B, n) (spec §5.5).

        Default: the full softmax, as the original scores PPO ratios. With `top_k`, the
        distribution the sampler actually draws from (logits / temperature truncated to the
        current top k), which removes the behaviour/target mismatch of spec §8 B12; a token
        that left the top k gets log-prob -50 (ratio ~ 0, no gradient).
        Dropout follows the module's mode; PPO must call this in eval mode (spec §8 B15).
        """
        logits = self.logits(context, tokens).float()
        if top_k is not None:
            logits = logits / temperature
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
        logp = logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
        return logp.clamp_min(-50.0) if top_k is not None else logp

    def ce_loss(self, context: Tensor, tokens: Tensor) -> Tensor:
        """Mean cross-entropy over batch and the n positions (spec §4.2)."""
        logits = self.logits(context, tokens)
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), tokens.reshape(-1).long())

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        context: Tensor,
        top_k: int | None = 5,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Autoregressive top-k sampling of n tokens (spec §4.4).

        Must be called in eval mode (raises otherwise): dropout would make the cached and
        uncached paths differ and the stored log-probs disagree with ``log_prob`` (spec §5.5).

        Returns tokens (B, n) long; logp (B, n): full-softmax log-prob at temperature 1, i.e.
        what ``log_prob`` gives and what PPO scores; logp_topk (B, n): log-prob under the
        distribution actually sampled from (logits / temperature, truncated to top-k).
        ``use_cache=False`` re-runs the growing sequence each step (the original's behaviour);
        both paths consume ``generator`` identically and give the same tokens.
        """
        if self.training:
            raise RuntimeError("SkillGPT.sample must be called in eval mode (call .eval())")
        b = context.shape[0]
        tokens = torch.empty(b, 0, dtype=torch.long, device=context.device)
        logps, logps_topk = [], []
        start = torch.full((b, 1), self.start_token, dtype=torch.long, device=context.device)
        cache = None
        for i in range(self.n_tokens):
            if not use_cache:
                seq = torch.cat([start, tokens], dim=1)
                x = torch.cat([context, self._embed_tokens(seq, 0)], dim=1)
                h, _ = self._run(x)
            elif cache is None:  # prefill [context, <s>]
                x = torch.cat([context, self._embed_tokens(start, 0)], dim=1)
                h, cache = self._run(x)
            else:  # one new position: the previously sampled token at position i
                h, cache = self._run(self._embed_tokens(tokens[:, -1:], i), cache)
            logits = self.head(h[:, -1]).float()  # (B, V)
            tok, lp_topk = _sample_top_k(logits, top_k, temperature, generator)
            logps.append(torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(-1))
            logps_topk.append(lp_topk)
            tokens = torch.cat([tokens, tok[:, None]], dim=1)
        return tokens, torch.stack(logps, dim=1), torch.stack(logps_topk, dim=1)


def _sample_top_k(logits: Tensor, top_k: int | None, temperature: float,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Sample one token per row from softmax(top-k(logits / T)); returns (tokens, log-probs)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits / temperature
    if top_k is None or top_k >= scaled.shape[-1]:
        vals, idx = scaled, None
    else:
        vals, idx = scaled.topk(top_k, dim=-1)
    logp = torch.log_softmax(vals, dim=-1)
    probs = logp.exp()
    if generator is not None and generator.device != probs.device:
        # The runners hold one seeded CPU generator (results must not depend on where the
        # policy runs); torch samples only with a generator on the tensor's device, so a policy
        # on a GPU draws on the CPU: a (B, k) copy per chunk, and the same tokens as on a CPU.
        choice = torch.multinomial(probs.to(generator.device), 1,
                                   generator=generator).to(probs.device)
    else:
        choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    lp = logp.gather(-1, choice).squeeze(-1)
    tok = choice.squeeze(-1) if idx is None else idx.gather(-1, choice).squeeze(-1)
    return tok, lp
