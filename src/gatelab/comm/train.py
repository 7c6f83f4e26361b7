"""Train CommFormer (or a baseline graph) with MAPPO and bi-level graph optimisation.

Network weights theta and graph logits alpha are updated *alternately* with their own Adam
optimisers and learning rates (DARTS first-order, as CommFormer; papers.md §5.1): after every
``alpha_every`` PPO epochs on theta, one pass over the same minibatches updates alpha only. For the
first ``alpha_warmup_updates`` updates alpha is frozen (a warm-up that ends, §5.4 item 2).

Every source of randomness of update ``u`` is drawn from ``np.random.default_rng([seed, u])``, so
a run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from gatelab.comm.checkpoint import load_checkpoint, save_checkpoint
from gatelab.comm.envs import ENVS, make_env
from gatelab.comm.gating import (
    causal_targets,
    gate_schedule,
    gate_temperature,
    next_budget_cost,
    next_label_share,
    threshold_rate,
)
from gatelab.comm.graph import GRAPH_KINDS
from gatelab.comm.model import CommConfig, CommFormer
from gatelab.comm.ppo import Batch, ValueNorm, collect, comm_penalty, gae, ppo_losses

log = logging.getLogger(__name__)

GATE_ESTIMATORS = ("st", "hybrid", "causal")


@dataclass(frozen=True)
class TrainConfig:
    """Environment, variant and optimisation settings of one training run."""

    env: str = "predator_prey"  # one of gatelab.comm.envs.ENVS
    agents: int = 5  # A (IC3Net medium: 5 predators)
    grid: int = 10  # grid side (IC3Net medium: 10)
    vision: int = 1  # view radius (IC3Net medium: 1)
    episode_limit: int = 0  # 0: the environment's default (40 for a 10x10 grid)
    graph: str = "learned"  # learned | random | full | none
    sparsity: float = 0.4  # S (CommFormer: 0.4)
    temporal_gate: bool = False  # per-agent listen gate
    comm_cost: float = 0.0  # penalty coefficient on the communication rate
    d_model: int = 64  # embedding width (CommFormer: 64)
    n_heads: int = 1  # attention heads (CommFormer: 1)
    n_envs: int = 64  # episodes per rollout B
    updates: int = 300  # PPO updates (one rollout each)
    ppo_epochs: int = 4  # epochs per update (CommFormer: 5-15)
    minibatches: int = 2  # minibatches per epoch
    lr: float = 7e-4  # theta Adam learning rate (MAPPO: 5e-4 to 7e-4)
    alpha_lr: float = 0.05  # alpha Adam lr: far above theta's so the graph moves past Gumbel noise
    gate_lr: float = 5e-3  # temporal-gate lr (own param group): its ST gradient is small
    alpha_every: int = 2  # an alpha pass after every n-th theta epoch (2 per update)
    alpha_warmup_updates: int = 5  # alpha frozen for the first updates
    gamma: float = 0.99  # discount (MAPPO)
    gae_lambda: float = 0.95  # GAE lambda (MAPPO)
    clip: float = 0.2  # PPO ratio clip
    entropy_coef: float = 0.01  # entropy bonus (MAPPO)
    value_coef: float = 1.0  # value-loss weight (MAPPO)
    max_grad_norm: float = 10.0  # gradient clipping (MAPPO)
    gumbel_tau: float = 1.0  # Gumbel top-k temperature
    graph_anneal: float = 0.5  # Gumbel noise 1 -> 0 linearly over this share of the updates
    gate_anneal: bool = False  # anneal the temporal gates' sampling to the threshold likewise
    gate_estimator: str = "st"  # st | hybrid | causal: how the gate trains (ppo.py, gating.py)
    gate_hidden: int = 0  # temporal gate: 0 linear, h > 0 a one-hidden-layer MLP of width h
    gate_init_bias: float = 1.0  # temporal gate's initial logit bias (1: p = 0.73, open)
    gate_warmup: float = 0.0  # share of the updates with every gate open (= no gate, untrained)
    cost_ramp: float = 0.0  # then the comm cost rises linearly from 0 over this share of updates
    comm_budget: float = 0.0  # > 0: adapt the cost (causal: label share) so the rate meets this
    budget_lr: float = 0.01  # step of that adaptation (causal: of the label share) per unit excess
    memory: bool = False  # append the agent's previous action (one-hot; gated: + listened) to obs
    gate_temp_min: float = 1.0  # hybrid/causal: training gates tempered 1 -> this when gated
    seed: int = 0  # seeds everything
    device: str = "cpu"  # torch device
    torch_threads: int = 1  # CPU threads (small model: 1 is fastest per core)
    checkpoint_every: int = 50  # updates between checkpoints (and at the end)

    def __post_init__(self) -> None:
        if self.env not in ENVS:
            raise ValueError(f"unknown env {self.env!r}; choose from {', '.join(ENVS)}")
        if self.agents < 2:
            raise ValueError(f"agents must be >= 2 (communication needs two), got {self.agents}")
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity}")
        if self.graph not in GRAPH_KINDS:
            raise ValueError(f"graph must be one of {', '.join(GRAPH_KINDS)}, got {self.graph!r}")
        if self.graph_anneal < 0:
            raise ValueError(f"graph_anneal must be >= 0, got {self.graph_anneal}")
        if self.gate_estimator not in GATE_ESTIMATORS:
            raise ValueError(
                f"gate_estimator must be one of {', '.join(GATE_ESTIMATORS)}, "
                f"got {self.gate_estimator!r}"
            )
        if self.gate_estimator == "hybrid" and self.gate_anneal:
            raise ValueError("gate_anneal needs gate_estimator='st' (hybrid samples Bernoulli(p))")
        for name in ("gate_warmup", "cost_ramp"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.comm_budget <= 1.0:
            raise ValueError(f"comm_budget must be in [0, 1], got {self.comm_budget}")
        if self.comm_budget > 0 and self.cost_ramp > 0:
            raise ValueError("comm_budget adapts the cost itself: set cost_ramp = 0")
        if not 0.0 < self.gate_temp_min <= 1.0:
            raise ValueError(f"gate_temp_min must be in (0, 1], got {self.gate_temp_min}")
        if self.gate_temp_min < 1.0 and self.gate_estimator == "st":
            raise ValueError("gate_temp_min < 1 needs gate_estimator='hybrid' or 'causal'")
        if self.gate_estimator == "causal" and self.comm_budget <= 0:
            raise ValueError("gate_estimator='causal' needs comm_budget > 0 (its listen share)")
        if self.gate_hidden < 0:
            raise ValueError(f"gate_hidden must be >= 0, got {self.gate_hidden}")
        if self.comm_cost < 0:
            raise ValueError(f"comm_cost must be >= 0, got {self.comm_cost}")
        for name in ("n_envs", "updates", "ppo_epochs", "minibatches", "alpha_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class TrainResult(NamedTuple):
    """The trained model, its value normaliser, one dict of scalars per update, the run folder."""

    model: CommFormer
    value_norm: ValueNorm
    history: list[dict]
    run_dir: Path | None


def build(cfg: TrainConfig, n_envs: int | None = None):
    """The environment batch and a fresh model for ``cfg`` (model init seeded by ``cfg.seed``)."""
    env = make_env(
        cfg.env, n_envs or cfg.n_envs, cfg.agents, cfg.grid, cfg.vision, cfg.episode_limit or None
    )
    model_cfg = CommConfig(
        obs_dim=env.obs_dim + (env.n_actions + int(cfg.temporal_gate) if cfg.memory else 0),
        n_actions=env.n_actions,
        n_agents=cfg.agents,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        sparsity=cfg.sparsity,
        graph=cfg.graph,
        temporal_gate=cfg.temporal_gate,
        gate_hidden=cfg.gate_hidden,
        gate_init_bias=cfg.gate_init_bias,
        gumbel_tau=cfg.gumbel_tau,
        graph_seed=cfg.seed,
    )
    torch.manual_seed(cfg.seed)
    return env, CommFormer(model_cfg).to(cfg.device)


def optimizers(model: CommFormer, cfg: TrainConfig):
    """Adam for theta (everything but alpha; the temporal gate in its own group) and for alpha."""
    named = [(n, p) for n, p in model.named_parameters() if n != "graph.alpha"]
    groups = [{"params": [p for n, p in named if not n.startswith("gate.")], "lr": cfg.lr}]
    gate = [p for n, p in named if n.startswith("gate.")]
    if gate:
        groups.append({"params": gate, "lr": cfg.gate_lr})
    alpha = model.graph.alpha if model.cfg.graph == "learned" else None
    opt_theta = torch.optim.Adam(groups, eps=1e-5)
    opt_alpha = torch.optim.Adam([alpha], lr=cfg.alpha_lr) if alpha is not None else None
    return opt_theta, opt_alpha


def graph_noise(cfg: TrainConfig, update: int) -> float:
    """Gumbel noise scale of update ``update``: ``1 - update / (graph_anneal * updates)``, >= 0.

    ``graph_anneal = 0``: no noise at all (deterministic top-k with straight-through throughout).
    """
    horizon = cfg.graph_anneal * cfg.updates
    return 0.0 if horizon <= 0 else max(0.0, 1.0 - update / horizon)


def _draws(seed: int, update: int) -> tuple[int, int, torch.Generator, np.random.Generator]:
    rng = np.random.default_rng([seed, update])
    env_seed, graph_seed, torch_seed = (int(x) for x in rng.integers(0, 2**31 - 1, 3))
    return env_seed, graph_seed, torch.Generator().manual_seed(torch_seed), rng


def train(
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    progress=None,
    resume: bool = False,
    max_seconds: float | None = None,
) -> TrainResult:
    """Run MAPPO for ``cfg.updates`` updates; write checkpoints, scalars and plots to ``run_dir``.

    Args:
        cfg: the run's settings.
        run_dir: output folder (``None``: nothing is written).
        progress: optional ``(done, total)`` callback, called after every update.
        resume: continue from ``run_dir/model.safetensors`` if it exists.
        max_seconds: wall-clock budget; training stops (with a checkpoint) after the update that
            crosses it. ``None``: run all ``cfg.updates``. Results then depend on machine speed,
            so :func:`compare` records the updates each run reached.
    """
    # setup
    random.seed(cfg.seed)
    torch.set_num_threads(cfg.torch_threads)
    env, model = build(cfg)
    value_norm = ValueNorm().to(cfg.device)
    opt_theta, opt_alpha = optimizers(model, cfg)
    run_dir = Path(run_dir) if run_dir is not None else None
    history: list[dict] = []
    start = 0
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume and (run_dir / "model.safetensors").exists():
            start = load_checkpoint(run_dir, model, value_norm, opt_theta, opt_alpha)
            history = _read_history(run_dir, start)
        else:  # a fresh start: scalars of an earlier (e.g. killed) run in this folder go
            for stale in ("scalars.csv", "metrics.jsonl"):
                (run_dir / stale).unlink(missing_ok=True)
        _write_config(run_dir, cfg, model.cfg)
    log.info("comm run %s from update %d: %s", run_dir, start, asdict(cfg))
    alpha0 = model.graph.alpha.detach().clone()
    agent_steps = sum(h["agent_steps"] for h in history[-1:])
    budget_cost = label_share = None
    if history and model.gate is not None:  # resumed: the multiplier after the last update
        budget_cost = next_budget_cost(cfg, history[-1])
        label_share = next_label_share(cfg, history[-1])
    began = time.perf_counter()
    for update in range(start, cfg.updates):
        tick = time.perf_counter()
        env_seed, graph_seed, generator, rng = _draws(cfg.seed, update)
        # rollout
        model.eval()
        noise = graph_noise(cfg, update)
        gates_on, cost = gate_schedule(cfg, update, budget_cost)
        temp = gate_temperature(cfg, update)
        ro = collect(
            model, env, env_seed, graph_seed, generator, training=True, graph_noise=noise,
            gate_noise=noise if cfg.gate_anneal else 1.0, gates=gates_on,
            open_critic=cfg.gate_estimator == "hybrid", gate_temp=temp, memory=cfg.memory,
        )  # fmt: skip
        values = value_norm.denormalize(ro.values)
        hybrid = cfg.gate_estimator == "hybrid" and ro.listen is not None
        causal = cfg.gate_estimator == "causal" and ro.listen is not None
        labels, causal_row = causal_targets(cfg, model, ro, label_share)
        rewards = ro.rewards
        if hybrid:  # the communication cost as a per-agent reward (gatelab.comm.ppo docstring)
            rewards = rewards - comm_penalty(ro.graph, ro.listen, ro.alive, cost)
        adv, returns = gae(rewards, values, ro.done, cfg.gamma, cfg.gae_lambda)
        alive = ro.alive.flatten()  # (T*B,)
        value_norm.update(returns.flatten(0, 1)[alive])
        targets = value_norm.normalize(returns)
        a_live = adv.flatten(0, 1)[alive]
        adv = (adv - a_live.mean()) / (a_live.std() + 1e-8)
        # update
        model.train()
        index = torch.nonzero(alive).squeeze(-1)  # joint samples (t, b) still running
        env_index = index % ro.graph.shape[0]
        flat = {
            "obs": ro.obs.flatten(0, 1),
            "actions": ro.actions.flatten(0, 1),
            "logp": ro.logp.flatten(0, 1),
            "adv": adv.flatten(0, 1),
            "targets": targets.flatten(0, 1),
            "acting": ro.acting.flatten(0, 1),
        }
        listen = None if ro.listen is None else ro.listen.flatten(0, 1)
        gate_logp = ro.gate_logp.flatten(0, 1) if hybrid else None
        train_alpha = opt_alpha is not None and update >= cfg.alpha_warmup_updates
        stats = []
        for epoch in range(cfg.ppo_epochs):
            order = torch.as_tensor(rng.permutation(len(index)))
            alpha_pass = train_alpha and (epoch + 1) % cfg.alpha_every == 0
            for opt in (opt_theta, opt_alpha) if alpha_pass else (opt_theta,):
                for chunk in order.chunk(cfg.minibatches):
                    rows, envs = index[chunk], env_index[chunk]
                    batch = Batch(
                        **{k: v[rows] for k, v in flat.items()},
                        listen=None if listen is None else listen[rows],
                        env_index=envs,
                        gate_logp=None if gate_logp is None else gate_logp[rows],
                    )
                    graph = ro.graph
                    if opt is opt_alpha:  # alpha step: re-attach the same Gumbel draw's gradient
                        graph = model.graph.relax(ro.graph, ro.graph_seed, ro.graph_noise)
                    parts = ppo_losses(
                        model, batch, graph[envs], cfg.clip, hybrid, temp, not causal
                    )
                    loss = (
                        parts.policy
                        + cfg.value_coef * parts.value
                        - cfg.entropy_coef * parts.entropy
                    )
                    if cfg.gate_estimator == "st" and ro.listen is not None:  # cost as a loss
                        loss = loss + cost * parts.comm
                    if causal:  # the gate classifies its own observation (causal labels)
                        gate_logits = model.gate.logits(batch.obs)
                        loss = loss + F.binary_cross_entropy_with_logits(gate_logits, labels[rows])
                    opt.zero_grad(set_to_none=True)
                    if opt_alpha is not None:
                        opt_alpha.zero_grad(set_to_none=True)
                    loss.backward()
                    if opt is opt_theta:
                        params = [p for g in opt_theta.param_groups for p in g["params"]]
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                        stats.append(torch.stack(list(parts)).detach())
                    opt.step()
        # log
        agent_steps += int(ro.steps.sum()) * cfg.agents
        mean = torch.stack(stats).mean(0).tolist()
        comm_live = ro.comm.flatten()[alive]
        row = {
            "update": update + 1,
            "agent_steps": agent_steps,
            "train/return": float(ro.rewards.sum(0).mean()),
            "train/success": float(ro.success.mean()),
            "train/steps": float(ro.steps.mean()),
            "train/comm_rate": float(comm_live.mean()),
            **threshold_rate(model, ro, alive, cost, temp),
            **causal_row,
            "loss/policy": mean[0],
            "loss/value": mean[1],
            "loss/entropy": mean[2],
            "loss/comm": mean[3],
            "loss/approx_kl": mean[4],
            "loss/clipfrac": mean[5],
            "graph/noise": noise,
            "graph/alpha_drift": float((model.graph.alpha.detach() - alpha0).abs().max()),
            "perf/steps_per_s": int(ro.steps.sum()) * cfg.agents / (time.perf_counter() - tick),
        }
        history.append(row)
        if model.gate is not None:
            budget_cost = next_budget_cost(cfg, row)
            label_share = next_label_share(cfg, row)
        if run_dir is not None:
            _append_scalars(run_dir, row)
            out_of_time = max_seconds is not None and time.perf_counter() - began > max_seconds
            last = update + 1 == cfg.updates or out_of_time
            if last or (update + 1) % cfg.checkpoint_every == 0:
                save_checkpoint(run_dir, model, value_norm, opt_theta, opt_alpha, update + 1)
        if progress is not None:
            progress(update + 1, cfg.updates)
        if max_seconds is not None and time.perf_counter() - began > max_seconds:
            log.warning("comm run %s stopped at update %d (time budget)", run_dir, update + 1)
            break
    env.close()
    if run_dir is not None:
        from gatelab.comm.plots import plot_comm_rate, plot_graph

        plot_graph(model, run_dir / "graph.png")
        plot_comm_rate(history, run_dir / "comm_rate.png")
    return TrainResult(model, value_norm, history, run_dir)


def _write_config(run_dir: Path, cfg: TrainConfig, model_cfg: CommConfig) -> None:
    payload = {"train": asdict(cfg), "model": asdict(model_cfg)}
    (run_dir / "config.json").write_text(json.dumps(payload, indent=2) + "\n")


def _append_scalars(run_dir: Path, row: dict) -> None:
    path = run_dir / "scalars.csv"
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def _read_history(run_dir: Path, upto: int) -> list[dict]:
    """Scalars of updates ``<= upto``; later rows (of an interrupted run) are dropped."""
    path = run_dir / "scalars.csv"
    if not path.exists():
        return []
    with path.open() as handle:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(handle)]
    rows = [r for r in rows if r["update"] <= upto]
    for r in rows:
        r["update"], r["agent_steps"] = int(r["update"]), int(r["agent_steps"])
    path.unlink()
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    for r in rows:
        _append_scalars(run_dir, r)
    return rows
