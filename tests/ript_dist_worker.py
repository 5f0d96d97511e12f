"""Run by tests/test_ript.py under torchrun: one PPO update on a fixed buffer, split over ranks.

Every rank builds the same tiny prior and the same 8 episodes; rank r keeps episodes r::W, and
the global minibatch (all 8 episodes) becomes 8 / W per rank, gradients averaged (spec §5.3, §5.6).
Every episode has the same number of tokens, so the averaged per-rank token means equal the
single-process token mean exactly (up to float rounding).
"""

import sys

import torch

from ript.models import SkillGPT
from ript.rl.buffer import Episode, RolloutBuffer
from ript.rl.distributed import Dist
from ript.rl.ppo import PPOConfig, ppo_update

dist = Dist()
torch.manual_seed(0)
prior = SkillGPT(vocab_size=16, n_tokens=4, d_model=16, layers=1, heads=2, ffn=32, dropout=0.0)
prior.eval()
g = torch.Generator().manual_seed(1)
episodes = []
for e in range(8):
    ctx = torch.randn(3, 2, 16, generator=g)
    tokens = torch.randint(0, 16, (3, 4), generator=g)
    with torch.no_grad():
        logp = prior.log_prob(ctx, tokens)
    episodes.append(Episode(context_id=e // 2, task_id=0, success=bool(e % 2), contexts=ctx,
                            tokens=tokens, logp=logp, valid_steps=3,
                            advantage=1.0 if e % 2 else -1.0))
# One minibatch holding the whole buffer: shuffling cannot pair episodes differently.
mine = RolloutBuffer(episodes[dist.rank::dist.world])
opt = torch.optim.SGD(prior.parameters(), lr=0.1)
ppo_update(prior.log_prob, list(prior.parameters()), opt, mine, PPOConfig(), epochs=1,
           minibatch_size=8 // dist.world, grad_clip=1e9,
           generator=torch.Generator().manual_seed(0),
           all_reduce_grads=dist.average_grads if dist.enabled else None)
if dist.is_main:
    torch.save(prior.state_dict(), sys.argv[1])
dist.close()
