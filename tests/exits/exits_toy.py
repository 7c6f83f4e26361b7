"""A toy JEI-DNN problem (synthetic features, identity blocks) shared by the training tests.

A plain module, not a conftest, so a kill test's subprocess can import it too.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from gatelab.exits import EarlyExitModel, FeatureCache, TrainConfig

COST = (0.25, 0.5, 0.75, 1.0)  # FLOPs fraction of leaving at each of the 4 exits


def synthetic_caches(n=600, d=6, c=4, n_exits=4, seed=0) -> FeatureCache:
    """Features whose class signal grows with depth, so later exits are more accurate."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    means = torch.randn(c, d, generator=torch.Generator().manual_seed(100))  # shared by all splits
    feats = [
        means[labels] * (0.5 + 0.5 * ell) + torch.randn(n, d, generator=g)
        for ell in range(n_exits - 1)
    ]
    head = F.one_hot(labels, c).float() * 4 + torch.randn(n, c, generator=g)
    return FeatureCache(feats, head, labels)


def toy_model(d=6, c=4, n_exits=4) -> EarlyExitModel:
    """Identity blocks: only the IMs and gates (seeded by the caller) have weights."""
    blocks = [nn.Identity() for _ in range(n_exits)]
    return EarlyExitModel(blocks, nn.Identity(), lambda s: s, d, c)


def toy_config(**changes) -> TrainConfig:
    """5 phases: a 90-step warm-up (9 batches per epoch), then 2 x (gate, IM) of 20 steps."""
    cfg = TrainConfig(warmup_epochs=10, n_rounds=2, phase_steps=20, batch_size=64, lr_im=1e-2)
    return dataclasses.replace(cfg, **changes)


# the kill tests' run: the same 5 phases, shorter (an 18-step warm-up, phases of 10 steps)
KILL_CONFIG = toy_config(lam=0.2, warmup_epochs=2, phase_steps=10)
