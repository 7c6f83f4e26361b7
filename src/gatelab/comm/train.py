"""Train CommFormer (or a baseline graph) with MAPPO and bi-level graph optimisation.

Network weights theta and graph logits alpha have their own Adam optimisers and learning rates
(DARTS first-order, as CommFormer, arXiv:2405.08550): in every ``alpha_every``-th PPO epoch each
minibatch's backward gives both gradients and both step; in the other epochs theta alone. For the
first ``alpha_warmup_updates`` updates alpha is frozen (a warm-up that ends).

Every source of randomness of update ``u`` is drawn from ``np.random.default_rng([seed, u])``, so
a run resumed from its checkpoint (which also holds both Adam states and the causal gates' label
share) continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from gatelab import runs
from gatelab.comm.config import Estimator, TrainConfig
from gatelab.comm.envs import env_for
from gatelab.comm.gating import (
    causal_targets,
    gate_schedule,
    gate_temperature,
    next_label_share,
    threshold_rate,
    uses_causal,
)
from gatelab.comm.model import CommConfig, CommFormer
from gatelab.comm.ppo import Batch, ValueNorm, collect, gae, ppo_losses
from gatelab.threads import torch_threads

log = logging.getLogger(__name__)

CHECKPOINT = "model.safetensors"
# may differ between a run and its resumption without changing what it computes
RESUME_IGNORES = ("train.device", "train.torch_threads", "train.checkpoint_every")


class TrainResult(NamedTuple):
    """The trained model, its value normaliser, one dict of scalars per update, the run folder."""

    model: CommFormer
    value_norm: ValueNorm
    history: list[dict]
    run_dir: Path | None


def build(cfg: TrainConfig, n_envs: int | None = None):
    """The environment batch and a fresh model for ``cfg`` (model init seeded by ``cfg.seed``)."""
    e, m = cfg.env, cfg.model
    env = env_for(e, n_envs or cfg.ppo.n_envs)
    model_cfg = CommConfig(
        obs_dim=env.obs_dim + (env.n_actions + int(m.temporal_gate) if e.memory else 0),
        n_actions=env.n_actions,
        n_agents=env.n_agents,  # a PettingZoo module's environment decides its team
        d_model=m.d_model,
        n_heads=m.n_heads,
        sparsity=m.sparsity,
        graph=m.graph.value,
        temporal_gate=m.temporal_gate,
        gate_hidden=m.gate_hidden,
        gate_init_bias=m.gate_init_bias,
        gumbel_tau=m.gumbel_tau,
        graph_seed=cfg.seed,
    )
    torch.manual_seed(cfg.seed)
    return env, CommFormer(model_cfg).to(cfg.device)


def optimizers(model: CommFormer, cfg: TrainConfig):
    """Adam for theta (everything but alpha; the temporal gate in its own group) and for alpha."""
    named = [(n, p) for n, p in model.named_parameters() if n != "graph.alpha"]
    groups = [{"params": [p for n, p in named if not n.startswith("gate.")], "lr": cfg.ppo.lr}]
    gate = [p for n, p in named if n.startswith("gate.")]
    if gate:
        groups.append({"params": gate, "lr": cfg.ppo.gate_lr})
    alpha = model.graph.alpha if model.cfg.graph == "learned" else None
    opt_theta = torch.optim.Adam(groups, eps=1e-5)
    opt_alpha = torch.optim.Adam([alpha], lr=cfg.ppo.alpha_lr) if alpha is not None else None
    return opt_theta, opt_alpha


def graph_noise(cfg: TrainConfig, update: int) -> float:
    """Gumbel noise scale of update ``update``: ``1 - update / (graph_anneal * updates)``, >= 0.

    ``graph_anneal = 0``: no noise at all (deterministic top-k with straight-through throughout).
    """
    horizon = cfg.ppo.graph_anneal * cfg.ppo.updates
    return 0.0 if horizon <= 0 else max(0.0, 1.0 - update / horizon)


def _draws(seed: int, update: int) -> tuple[int, int, torch.Generator, np.random.Generator]:
    rng = np.random.default_rng([seed, update])
    env_seed, graph_seed, torch_seed = (int(x) for x in rng.integers(0, 2**31 - 1, 3))
    return env_seed, graph_seed, torch.Generator().manual_seed(torch_seed), rng


def claim(cfg: TrainConfig, run_dir: str | Path, fresh: bool = False) -> bool:
    """Check ``cfg``'s environment and claim ``run_dir`` for it before anything runs.

    What :func:`train` does first, for a CLI that wants its one-line errors before its
    progress bar: builds one environment (naming what it lacks) and calls
    :func:`gatelab.runs.start_run` (``fresh`` empties the folder). Returns whether the folder
    holds the same run (to resume).
    """
    env, model = build(cfg, n_envs=1)
    env.close()
    config = {"train": cfg.to_dict(), "model": asdict(model.cfg)}
    return runs.start_run(run_dir, config, fresh=fresh, ignore=RESUME_IGNORES)


def train(
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    progress=None,
    fresh: bool = False,
    max_seconds: float | None = None,
) -> TrainResult:
    """Run MAPPO for ``cfg.ppo.updates`` updates; write checkpoints, metrics, plots to ``run_dir``.

    A ``run_dir`` holding a run of the same config resumes from its checkpoint (bit for bit as
    the uninterrupted run on CPU); one holding another config's run is refused
    (:func:`gatelab.runs.start_run`), never overwritten.

    Args:
        cfg: the run's settings.
        run_dir: output folder (``None``: nothing is written).
        progress: optional ``(done, total)`` callback, called after every update.
        fresh: empty ``run_dir`` first and start over.
        max_seconds: wall-clock budget; training stops (with a checkpoint) after the update that
            crosses it. ``None``: run all updates. Results then depend on machine speed, so
            :func:`gatelab.comm.compare.compare` records the updates each run reached.

    Raises:
        ValueError: ``run_dir`` holds another configuration's run (the message names
            ``--fresh``), or its checkpoint is unreadable.
    """
    with torch_threads(cfg.torch_threads):
        # ---- setup: seeded model, optimisers, and the checkpoint to resume from
        random.seed(cfg.seed)
        env, model = build(cfg)
        value_norm = ValueNorm().to(cfg.device)
        opt_theta, opt_alpha = optimizers(model, cfg)
        run_dir = Path(run_dir) if run_dir is not None else None
        config = {"train": cfg.to_dict(), "model": asdict(model.cfg)}
        alpha0 = model.graph.alpha.detach().clone()  # the run's initial graph logits
        start, state, history = _start(
            run_dir, fresh, config, cfg, model, value_norm, opt_theta, opt_alpha
        )
        log.info("comm run %s from update %d: %s", run_dir, start, cfg)
        agent_steps, share = state.get("agent_steps", 0), state.get("label_share")
        causal = uses_causal(cfg)
        p = cfg.ppo
        began = time.perf_counter()
        for update in range(start, p.updates):
            runs.fault_point("comm-update")  # kill tests: die before an update
            tick = time.perf_counter()
            env_seed, graph_seed, generator, rng = _draws(cfg.seed, update)
            # ---- rollout with the stored graph and gates, then GAE on normalised values
            model.eval()
            noise = graph_noise(cfg, update)
            gates_on, cost = gate_schedule(cfg, update)
            temp = gate_temperature(cfg, update)
            ro = collect(
                model, env, env_seed, graph_seed, generator, training=True, graph_noise=noise,
                gate_noise=noise if cfg.gate.anneal else 1.0, gates=gates_on, gate_temp=temp,
                memory=cfg.env.memory,
            )  # fmt: skip
            values = value_norm.denormalize(ro.values)
            labels, causal_row = causal_targets(cfg, model, ro, share)
            adv, returns = gae(ro.rewards, values, ro.done, p.gamma, p.gae_lambda)
            alive = ro.alive.flatten()  # (T*B,)
            value_norm.update(returns.flatten(0, 1)[alive])
            targets = value_norm.normalize(returns)
            a_live = adv.flatten(0, 1)[alive]
            adv = (adv - a_live.mean()) / (a_live.std() + 1e-8)
            # ---- PPO epochs on theta (and alpha), stopped early past the target KL
            model.train()
            train_alpha = opt_alpha is not None and update >= p.alpha_warmup_updates
            flat = {"adv": adv, "targets": targets, "labels": labels}
            epochs = _ppo_epochs(
                cfg, model, ro, flat, (opt_theta, opt_alpha), train_alpha, cost, rng
            )
            # ---- log, adapt the label share, checkpoint
            agent_steps += int(ro.steps.sum()) * model.cfg.n_agents
            mean = torch.stack(epochs.stats).mean(0).tolist()
            row = {
                "step": update + 1,
                "agent_steps": agent_steps,
                "train/return": float(ro.rewards.sum(0).mean()),
                "train/success": float(ro.success.mean()),
                "train/steps": float(ro.steps.mean()),
                "train/comm_rate": float(ro.comm.flatten()[alive].mean()),
                **threshold_rate(model, ro, alive, cost, temp),
                **causal_row,
                **dict(zip(LOSS_KEYS, mean, strict=True)),
                "ppo/approx_kl_max": epochs.kl_max,
                "ppo/epochs": epochs.done,
                "ppo/kl_stop": float(epochs.kl_stop),
                "graph/noise": noise,
                "graph/alpha_drift": float((model.graph.alpha.detach() - alpha0).abs().max()),
                "perf/steps_per_s": int(ro.steps.sum())
                * model.cfg.n_agents
                / (time.perf_counter() - tick),
            }
            history.append(row)
            if causal:
                share = next_label_share(cfg, update, row)
            out_of_time = max_seconds is not None and time.perf_counter() - began > max_seconds
            if run_dir is not None:
                runs.append_metrics(run_dir, row)
                runs.fault_point("comm-metrics")  # kill tests: logged, not checkpointed
                last = update + 1 == p.updates or out_of_time
                if last or (update + 1) % cfg.checkpoint_every == 0:
                    runs.save_checkpoint(
                        run_dir / CHECKPOINT, config=config, step=update + 1,
                        modules={"model": model, "value_norm": value_norm},
                        optimizers={"theta": opt_theta, "alpha": opt_alpha},
                        state={"agent_steps": agent_steps, "label_share": share},
                    )  # fmt: skip
            if progress is not None:
                progress(update + 1, p.updates)
            if out_of_time:
                log.warning("comm run %s stopped at update %d (time budget)", run_dir, update + 1)
                break
        env.close()
    if run_dir is not None:
        from gatelab.comm.plots import plot_comm_rate, plot_graph

        plot_graph(model, run_dir / "graph.png")
        plot_comm_rate(history, run_dir / "comm_rate.png")
    return TrainResult(model, value_norm, history, run_dir)


class Epochs(NamedTuple):
    """What the PPO epochs of one update did."""

    stats: list[torch.Tensor]  # the loss parts (LOSS_KEYS) of every theta step
    done: float  # epochs completed (a stopped epoch counts its share of minibatches)
    kl_stop: bool  # stopped because a minibatch's approximate KL passed ppo.target_kl
    kl_max: float  # the largest approximate KL a minibatch measured


def _ppo_epochs(cfg, model, ro, flat, optims, train_alpha: bool, cost: float, rng) -> Epochs:
    """PPO epochs on theta; every ``alpha_every``-th epoch also steps alpha, from the same backward.

    In those epochs each minibatch's graph is the stored draw re-attached to alpha
    (:meth:`CommGraph.relax`: same forward value), so one backward gives both gradients and both
    optimisers step (first-order DARTS with simultaneous steps; no separate alpha pass).
    The KL guard: each minibatch measures the approximate KL of the current policy to the
    rollout's before its step; past ``ppo.target_kl`` (> 0) the update ends there, with no step
    on that minibatch and no further pass on theta or alpha (after Stable-Baselines3's PPO).
    """
    p, (opt_theta, opt_alpha) = cfg.ppo, optims
    causal, straight_through = uses_causal(cfg), cfg.gate.kind is Estimator.st
    alive = ro.alive.flatten()  # (T*B,)
    index = torch.nonzero(alive).squeeze(-1)  # joint samples (t, b) still running
    env_index = index % ro.graph.shape[0]
    stored = {k: getattr(ro, k).flatten(0, 1) for k in ("obs", "actions", "logp", "acting")}
    data = {**stored, "adv": flat["adv"].flatten(0, 1), "targets": flat["targets"].flatten(0, 1)}
    listen = None if ro.listen is None else ro.listen.flatten(0, 1)
    gated, labels = listen is not None, flat["labels"]
    theta = [q for g in opt_theta.param_groups for q in g["params"]]
    stats, kl_max, steps = [], 0.0, 0
    for epoch in range(p.ppo_epochs):
        order = torch.as_tensor(rng.permutation(len(index)))
        alpha_step = train_alpha and (epoch + 1) % p.alpha_every == 0
        for chunk in order.chunk(p.minibatches):
            rows, envs = index[chunk], env_index[chunk]
            batch = Batch(
                **{k: v[rows] for k, v in data.items()},
                listen=listen[rows] if gated else None,
                env_index=envs,
            )
            graph = ro.graph  # (B, A, A) as the rollout drew it
            if alpha_step:  # the same Gumbel draw, its gradient re-attached to alpha
                graph = model.graph.relax(ro.graph, ro.graph_seed, ro.graph_noise)
            parts = ppo_losses(model, batch, graph[envs], p.clip, not (causal and gated))
            kl = float(parts.approx_kl)
            kl_max = kl if not kl <= kl_max else kl_max  # NaN (a diverged policy) sticks
            if p.target_kl > 0 and not kl <= p.target_kl:
                done = steps / p.minibatches
                return Epochs(stats or [torch.stack(list(parts)).detach()], done, True, kl_max)
            loss = parts.policy + p.value_coef * parts.value - p.entropy_coef * parts.entropy
            if straight_through and gated:  # the paper's cost on the comm rate
                loss = loss + cost * parts.comm
            if causal and gated:  # the gate classifies its observation (labels)
                gate_logits = model.gate.logits(batch.obs)
                loss = loss + F.binary_cross_entropy_with_logits(gate_logits, labels[rows])
            model.zero_grad(set_to_none=True)  # theta and alpha
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theta, p.max_grad_norm)  # theta's norm; alpha's own
            stats.append(torch.stack(list(parts)).detach())
            steps += 1
            opt_theta.step()
            if alpha_step:
                opt_alpha.step()
    return Epochs(stats, steps / p.minibatches, False, kl_max)


LOSS_KEYS = ("loss/policy", "loss/value", "loss/entropy", "loss/comm", "loss/approx_kl",
             "loss/clipfrac")  # fmt: skip


def _start(run_dir, fresh, config, cfg, model, value_norm, opt_theta, opt_alpha):
    """``(first update, controller state, history so far)``: from the checkpoint, or fresh.

    Resuming loads the model, value normaliser and both Adam states in place (the previous
    checkpoint, with a warning, if the last one is torn) and cuts ``metrics.jsonl`` back to the
    checkpoint's update (no update is logged twice); a run killed before its first checkpoint
    starts over.
    """
    if run_dir is None:
        return 0, {}, []
    path = run_dir / CHECKPOINT
    if not (runs.start_run(run_dir, config, fresh=fresh, ignore=RESUME_IGNORES)
            and runs.checkpoint_exists(path)):  # fmt: skip
        (run_dir / runs.METRICS).unlink(missing_ok=True)
        return 0, {}, []
    ck = runs.load_checkpoint(
        path, modules={"model": model, "value_norm": value_norm},
        optimizers={"theta": opt_theta, "alpha": opt_alpha}, device=cfg.device,
    )  # fmt: skip
    runs.truncate_metrics(run_dir, ck.step)
    return ck.step, ck.state, runs.read_metrics(run_dir)


def load_model(path: str | Path, device: str = "cpu") -> tuple[CommFormer, TrainConfig]:
    """Load a trained model from its ``model.safetensors`` (or its run folder) alone.

    The checkpoint's metadata holds the config, so the file needs nothing beside it.

    Returns:
        The model in eval mode and the run's :class:`TrainConfig`.

    Raises:
        FileNotFoundError: the checkpoint is missing.
        ValueError: the file is not a gatelab.comm checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    ck = runs.load_checkpoint(path, device=device)  # no module yet: the config says which
    if "model" not in ck.config or "train" not in ck.config:
        raise ValueError(f"{path}: not a gatelab.comm checkpoint (no comm config in its metadata)")
    model = CommFormer(CommConfig(**ck.config["model"]))
    weights = {k.removeprefix("model."): v for k, v in ck.tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return model.to(device).eval(), TrainConfig.from_dict(ck.config["train"])
