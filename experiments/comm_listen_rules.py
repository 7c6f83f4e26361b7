r"""How far can temporal gating cut communication on Predator-Prey without losing success?

Takes trained CommFormer runs (no temporal gate) and evaluates each with a hand-written listen
rule in place of a learned gate, on the evaluation episodes ``compare`` uses (200 episodes, seed
10000 + training seed, actions sampled, the deterministic execution graph):

* ``always``: every agent listens (reproduces the run's own ``eval.json``: a sanity check);
* ``unless-reached``: a predator on the prey stops listening (its actions are ignored anyway);
* ``unless-prey-seen``: also a predator with the prey in its view stops listening;
* ``every-other-step`` and ``random-half``: blind 50% cuts (each agent listens at alternate
  steps, in a random phase; or with probability 1/2 at each step). With ``--memory`` runs they
  show how much one-step memory lets an agent act on the previous step's messages.

Both rules read only what the agent's own observation shows (its ``reached`` flag, the prey
channel of its window), so a learned gate on the observation can represent them. The
communication rate is active edges over ``A (A - 1)`` per live step, as in
:mod:`gatelab.comm.eval`. ``experiments/comm_gate_diag.py`` is the companion: who listens in a
*gated* run, and what a random cut of listening costs. Run, e.g.:

    PYTHONPATH=src .venv/bin/python experiments/comm_listen_rules.py \
        runs/comm/predator_prey/commformer
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from gatelab.comm.config import TrainConfig
from gatelab.comm.envs import env_for
from gatelab.comm.graph import comm_rate, gate_graph
from gatelab.comm.ppo import with_memory
from gatelab.comm.train import load_model
from gatelab.threads import torch_threads

RULES = ("always", "unless-reached", "unless-prey-seen", "every-other-step", "random-half")


def listen_rule(env, rule: str, step: int, phase: np.ndarray, rng: np.random.Generator):
    """``(B, A)`` 0/1 listen decisions of step ``step``.

    The state rules read only what the agent itself observes; ``phase`` ``(B, A)`` in {0, 1}
    staggers ``every-other-step``.
    """
    listen = np.ones(env.reached.shape, dtype=bool)
    if rule == "every-other-step":
        listen = (step + phase) % 2 == 0
    if rule == "random-half":
        listen = rng.random(listen.shape) < 0.5
    if rule in ("unless-reached", "unless-prey-seen"):
        listen &= ~env.reached
    if rule == "unless-prey-seen":
        listen &= np.abs(env.pos - env.prey[:, None]).max(-1) > env.vision  # prey outside window
    return listen


@torch.no_grad()
def evaluate_rule(model, train_cfg: TrainConfig, rule: str, seed: int, episodes: int = 200) -> dict:
    """Success rate and communication rate of ``model`` with ``rule`` as its temporal gate."""
    torch.manual_seed(seed)
    success, comm, done = [], [], 0
    graph0 = model.graph.execution()
    while done < episodes:
        n = min(100, episodes - done)
        e = train_cfg.env
        env = env_for(e, n)
        env_seed = seed * 1_000_003 + done  # as gatelab.comm.eval.evaluate
        generator = torch.Generator().manual_seed(env_seed)
        memory = train_cfg.env.memory
        obs = torch.as_tensor(env.reset(env_seed))
        gated = model.gate is not None
        obs = with_memory(obs, None, env.n_actions, None, gated) if memory else obs
        graph = graph0.expand(n, -1, -1).clone()
        alive = np.ones(n, dtype=bool)
        rng = np.random.default_rng(env_seed)
        phase = rng.integers(0, 2, env.reached.shape)
        for t in range(env.episode_limit):
            listen = torch.as_tensor(listen_rule(env, rule, t, phase, rng), dtype=torch.float32)
            actions = model.act(obs, graph, listen, generator).actions
            comm.append(comm_rate(gate_graph(graph, listen)).numpy()[alive])
            step = env.step(actions.numpy())
            alive = ~step.done
            obs = torch.as_tensor(step.obs)
            obs = with_memory(obs, actions, env.n_actions, listen, gated) if memory else obs
            if not alive.any():
                break
        success.append(step.success.copy())
        done += n
    return {
        "success_rate": float(np.concatenate(success).mean()),
        "comm_rate": float(np.concatenate(comm).mean()),
    }


def main() -> None:
    """Evaluate every seed of a variant's runs under each rule; print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "variant_dir",
        type=Path,
        nargs="?",
        default=Path("runs/comm/predator_prey/commformer"),
        help="folder of seed*/model.safetensors runs (default: %(default)s)",
    )
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    runs = sorted(args.variant_dir.glob("seed*/model.safetensors"))
    if not runs:
        raise SystemExit(f"no seed*/model.safetensors under {args.variant_dir}")
    results = {rule: [] for rule in RULES}
    for path in runs:
        model, train_cfg = load_model(path)
        if train_cfg.env.name != "predator_prey":
            raise SystemExit(
                f"{path}: the rules read Predator-Prey state, got {train_cfg.env.name}"
            )
        for rule in RULES:
            metrics = evaluate_rule(model, train_cfg, rule, 10_000 + train_cfg.seed, args.episodes)
            results[rule].append(metrics | {"seed": train_cfg.seed})
            print(path.parent.name, rule, metrics, flush=True)
    print(f"\n{len(runs)} seeds, {args.episodes} episodes each")
    print("| listen rule | success rate | comm rate |\n|---|---|---|")
    for rule, rows in results.items():
        s = np.array([r["success_rate"] for r in rows])
        c = np.array([r["comm_rate"] for r in rows])
        print(f"| {rule} | {s.mean():.3f} ± {s.std():.3f} | {c.mean():.3f} ± {c.std():.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    with torch_threads(1):
        main()
