"""OFT's small heads and RIPT's Laplace scale head (vla_spec §3.2, §3.4, §4.1).

Module names follow the official state dicts, so an OFT `action_head--*_checkpoint.pt` (after
its `module.` prefix is stripped) loads with a strict key check: `model.layer_norm1`,
`model.fc1`, `model.mlp_resnet_blocks.{i}.ffn.{0 LayerNorm, 1 Linear}`, `model.layer_norm2`,
`model.fc2`; the proprio projector is `fc1`/`fc2`; RIPT's scale head is `trunk.*`/`log_b_head.*`.
"""

from __future__ import annotations

from torch import Tensor, nn

from ript.vla.prismatic import ACTION_DIM, PROPRIO_DIM


class MLPResNetBlock(nn.Module):
    """x + ReLU(Linear(LayerNorm(x))) (pre-LN residual)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm, Linear in→h, ReLU; residual blocks at h; LayerNorm, Linear h→out (§3.4)."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim)
                                               for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


def _chunk_rows(hidden: Tensor, action_dim: int) -> Tensor:
    """(B, 56, H) → (B, 8, 7H): chunk step k concatenates hidden states 7k … 7k+6 (§3.4)."""
    B, n, H = hidden.shape
    if n % action_dim:
        raise ValueError(f"{n} action hidden states are not whole chunk steps of {action_dim}")
    return hidden.reshape(B, n // action_dim, action_dim * H)


class L1RegressionActionHead(nn.Module):
    """OFT's continuous head: 56 action hidden states → (B, 8, 7) normalised actions."""

    def __init__(self, hidden_dim: int, action_dim: int = ACTION_DIM, num_blocks: int = 2):
        super().__init__()
        self.action_dim = action_dim
        self.model = MLPResNet(num_blocks, action_dim * hidden_dim, hidden_dim, action_dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.model(_chunk_rows(hidden.to(self.model.fc1.weight.dtype), self.action_dim))


class ProprioProjector(nn.Module):
    """8-D normalised state (LIBERO: eef position, axis-angle, gripper qpos) → one LLM token:
    fc1 8→H, GELU, fc2 H→H (§3.2)."""

    def __init__(self, llm_dim: int, proprio_dim: int = PROPRIO_DIM):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: Tensor) -> Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


class LaplaceScaleHead(nn.Module):
    """RIPT's log b head (§4.1): trunk MLPResNet(2 blocks, 7H → H → H), then Linear H→7 whose
    bias starts at -3 and weights at xavier_uniform(gain 0.01), so b ≈ e^-3 everywhere at init."""

    def __init__(self, hidden_dim: int, action_dim: int = ACTION_DIM, num_blocks: int = 2):
        super().__init__()
        self.action_dim = action_dim
        self.trunk = MLPResNet(num_blocks, action_dim * hidden_dim, hidden_dim, hidden_dim)
        self.log_b_head = nn.Linear(hidden_dim, action_dim)
        nn.init.xavier_uniform_(self.log_b_head.weight, gain=0.01)
        nn.init.constant_(self.log_b_head.bias, -3.0)

    def forward(self, hidden: Tensor) -> Tensor:
        x = _chunk_rows(hidden.to(self.log_b_head.weight.dtype), self.action_dim)
        return self.log_b_head(self.trunk(x))

    def load_ript_state(self, state: dict) -> None:
        """RIPT's `header_checkpoint` layout {scale_trunk: …, log_b_head: …} (§4.1), strictly."""
        self.trunk.load_state_dict(state["scale_trunk"])
        self.log_b_head.load_state_dict(state["log_b_head"])

    def ript_state(self) -> dict:
        return {"scale_trunk": self.trunk.state_dict(), "log_b_head": self.log_b_head.state_dict()}
