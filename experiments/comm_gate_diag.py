"""Who listens: temporal-gate diagnostics of trained Predator-Prey checkpoints.

For each run folder, one batch of evaluation episodes (deterministic graph and gates, sampled
actions, episodes seeded by ``--seed``) and, per live agent-step, whether the agent listened,
split into *frozen* predators (already on the prey: ``env.acting()`` false) and *searching* ones.
With ``--drop`` it also evaluates the same model with each receiver's listening further kept only
with probability q (independent coin per agent and step): how much success a *random* cut of the
searchers' listening costs (``experiments/comm_listen_rules.py``: what hand-written listen rules
on the agent's own view cut at no loss). Run, e.g.:

    PYTHONPATH=src .venv/bin/python experiments/comm_gate_diag.py \
        runs/comm_pp6/comm/predator_prey/commformer/seed0 --drop 0.75 0.5
"""

import argparse
import json

import torch

import gatelab.comm.ppo as ppo
from gatelab.comm.envs import env_for
from gatelab.comm.train import load_model
from gatelab.threads import torch_threads


def rollout(model, cfg, episodes: int, seed: int):
    """One batch of deterministic-gate evaluation episodes (``cfg``: the run's TrainConfig)."""
    e = cfg.env
    env = env_for(e, episodes)
    gen = torch.Generator().manual_seed(seed)
    return ppo.collect(model, env, seed, 0, gen, training=False, memory=e.memory)


def main() -> None:
    """Print one JSON line per run (and per drop probability)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs",
        nargs="*",
        default=["runs/comm/predator_prey/commformer_tg/seed0"],
        help="run folders with a model.safetensors (default: %(default)s)",
    )
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=30_000)
    parser.add_argument("--drop", type=float, nargs="*", default=[])
    args = parser.parse_args()
    original = ppo.listen_gates
    for run in args.runs:
        model, cfg = load_model(f"{run}/model.safetensors")
        ppo.listen_gates = original
        ro = rollout(model, cfg, args.episodes, args.seed)
        live = ro.alive[..., None].expand_as(ro.acting)
        frozen, searching = ~ro.acting & live, ro.acting & live
        listen = ro.listen if ro.listen is not None else torch.ones_like(ro.acting, dtype=float)
        row = {
            "run": run,
            "success_rate": float(ro.success.mean()),
            "comm_rate": float(ro.comm[ro.alive].mean()),
            "frozen_share": float(frozen.sum() / live.sum()),
            "listen_frozen": float(listen[frozen].float().mean()),
            "listen_searching": float(listen[searching].float().mean()),
        }
        print(json.dumps(row), flush=True)
        for q in args.drop:
            coins = torch.Generator().manual_seed(args.seed + 1)

            def thinned(model, obs, training, generator, noise=1.0, temp=1.0, q=q, coins=coins):
                base = original(model, obs, training, generator, noise, temp)
                if base is None:
                    base = torch.ones(obs.shape[:2], dtype=obs.dtype)
                return base * (torch.rand(base.shape, generator=coins) < q).to(base.dtype)

            ppo.listen_gates = thinned
            ro = rollout(model, cfg, args.episodes, args.seed)
            out = {"run": run, "keep": q, "success_rate": float(ro.success.mean()),
                   "comm_rate": float(ro.comm[ro.alive].mean())}  # fmt: skip
            print(json.dumps(out), flush=True)
        ppo.listen_gates = original


if __name__ == "__main__":
    with torch_threads(1):
        main()
