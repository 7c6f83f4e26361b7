"""``gatelab reproduce comm``: the runs behind docs/comm.md's results table, and the table.

Four tasks, Predator-Prey (5 predators, 10x10) and Predator-Capture-Prey (3 perception and 2
capture agents, 10x10), each memoryless and with ``--memory``; on each the five variants of
:func:`gatelab.comm.compare.compare` (full, commformer at S = 0.4, commformer + causal temporal
gates at budget 0.22, random graph, none), 200 updates of 64 episodes, seeds 10, 11, ...
(``--seeds N``; the settings were chosen on seeds 0 and 1, so the table never sees them), each
run evaluated on 200 episodes. Per task and variant: IQM and mean success with stratified
bootstrap 95% intervals (rliable, Agarwal et al., NeurIPS 2021, arXiv:2108.13264), and the
probability of improvement of the learned graph over the random one.

``small=True`` (Python API only) is the reduced grid that fits a shared 2-core machine: the same
tasks and variants on 5x5 grids with a 20-step limit (Predator-Prey with 3 predators,
Predator-Capture-Prey with 2 perception and 2 capture agents), 50 updates of 32 episodes, 100
evaluation episodes per run; docs/comm.md says which grid its table comes from.

Resumable: an evaluated run is reused, a cut one resumes from its checkpoint; the table of a
task is written as soon as its runs are done (``runs/reproduce/comm/tables.md|json``), so an
interrupted reproduce has the finished tasks' tables. ``tasks`` (``--task``) runs some of the
four tasks only; their tables join those already in ``tables.json``, so tasks run one at a time
add up to the whole table.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from gatelab.comm.compare import VARIANTS, CompareConfig, compare, run_dirs
from gatelab.comm.config import Env, GateConfig, TrainConfig
from gatelab.runs import atomic_write_bytes, atomic_write_json, read_json

# (environment, memory), in the order they run: Predator-Prey first, whose runs were the first
# to be measured, then Predator-Capture-Prey
TASKS = (
    (Env.predator_prey, True),
    (Env.predator_prey, False),
    (Env.predator_capture_prey, True),
    (Env.predator_capture_prey, False),
)
FIRST_SEED = 10  # table seeds 10, 11, ...: seeds 0 and 1 chose the settings
UPDATES = 200  # PPO updates per run
COMM_BUDGET = 0.22  # commformer_tg's causal gates (GateConfig.budgeted)
EVAL_EPISODES = 200
REPS = 20_000  # bootstrap replications
# measured 2026-12-03/04 on the 2-core machine, two runs at a time: 4-6.5 min per full-grid run
# (50 runs of a task took 1 h 36 min to 2 h 48 min), about 25 s per reduced-grid run
MINUTES_PER_RUN = 5.0
MINUTES_PER_RUN_SMALL = 25 / 60


def task_name(env: Env, memory: bool) -> str:
    """``predator_prey-memory`` and the like: the task's folder and table name."""
    return f"{env.value}-{'memory' if memory else 'memoryless'}"


SMALL_AGENTS = {Env.predator_prey: 3, Env.predator_capture_prey: 4}  # the reduced grid's teams


TASK_NAMES = tuple(task_name(env, memory) for env, memory in TASKS)


def configs(
    seeds: int = 10, jobs: int = 1, small: bool = False, tasks: tuple[str, ...] | None = None
) -> list[tuple[str, CompareConfig]]:
    """``(task name, CompareConfig)`` of the tasks of the table (``small``: the reduced grid).

    ``tasks``: names from :data:`TASK_NAMES` (all four when ``None``), run in the table's order.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    unknown = [t for t in tasks or () if t not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASK_NAMES)}")
    out = []
    for env, memory in TASKS:
        if tasks is not None and task_name(env, memory) not in tasks:
            continue
        base = TrainConfig.preset(env).with_(env={"memory": memory}, ppo={"updates": UPDATES})
        if small:
            env_small = {"agents": SMALL_AGENTS[env], "grid": 5, "episode_limit": 20}
            base = base.with_(env=env_small, ppo={"updates": 50, "n_envs": 32})
        cfg = CompareConfig(
            base=base,
            seeds=tuple(range(FIRST_SEED, FIRST_SEED + seeds)),
            comm_budget=COMM_BUDGET,
            eval_episodes=100 if small else EVAL_EPISODES,
            jobs=jobs,
        )
        out.append((task_name(env, memory) + ("-small" if small else ""), cfg))
    GateConfig.budgeted(COMM_BUDGET)  # the gates' settings are valid
    return out


def expected_time(
    seeds: int = 10,
    jobs: int = 1,
    small: bool = False,
    tasks: tuple[str, ...] | None = None,
    cores: int | None = None,
    runs_dir: Path | None = None,
) -> str:
    """What ``reproduce`` with these options will take: runs x minutes per run / parallel runs.

    ``cores``: of the machine it runs on (this one when ``None``). ``runs_dir``: the folder
    ``reproduce`` will use; the runs already evaluated there are reused, so they are not timed.
    """
    chosen = configs(seeds, jobs, small, tasks)
    runs = len(chosen) * seeds * len(VARIANTS)
    done = 0
    if runs_dir is not None:
        out = Path(runs_dir) / "reproduce" / "comm" / "runs"
        done = sum(
            (run / "eval.json").exists()
            for name, cfg in chosen
            for _, _, run in run_dirs(cfg, out / name)
        )
    per_run = MINUTES_PER_RUN_SMALL if small else MINUTES_PER_RUN
    cores = cores or os.cpu_count() or 1
    parallel = max(1, min(jobs, cores))  # runs past the core count only queue
    minutes = (runs - done) * per_run / parallel
    total = f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"
    reused = f" ({done} already evaluated)" if done else ""
    return (
        f"about {per_run * 60:.0f} s per run" if small else f"about {per_run:.0f} min per run"
    ) + f": {runs} runs{reused}, about {total} with {parallel} at a time"


EXPECTED_TIME = expected_time(jobs=2, cores=2)  # the whole table on the 2-core machine


def interval_table(runs: dict[str, list[dict]], reps: int = REPS, seed: int = 0) -> dict:
    """Success IQM and mean with 95% intervals per variant, and the paper's comparisons.

    ``runs``: ``{variant: [eval dicts of its seeds]}``. Each task is one stratum, so rliable's
    stratified bootstrap resamples the seeds of a variant; comparisons between two variants
    resample each independently. Returns plain JSON.
    """
    import warnings

    warnings.filterwarnings("ignore", "random_state is deprecated", FutureWarning)  # arch 7.2
    with _global_numpy_seed(seed):
        return _interval_table(runs, reps, seed)


@contextmanager
def _global_numpy_seed(seed: int):
    """Seed numpy's global generator for the block, then put the caller's state back.

    rliable 1.2.0's stratified bootstraps draw their resamples with ``np.random.choice`` (their
    ``update_indices``), whatever ``random_state`` says, so without this the same runs gave
    intervals that differed in the third decimal from one call to the next.
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _interval_table(runs: dict[str, list[dict]], reps: int, seed: int) -> dict:
    from rliable import library as rly
    from rliable import metrics

    def rng():
        return np.random.RandomState(seed)

    success = {v: np.array([[r["success_rate"]] for r in runs[v]]) for v in VARIANTS}  # (N, 1)

    def iqm_and_mean(scores):
        return np.array([metrics.aggregate_iqm(scores), metrics.aggregate_mean(scores)])

    point, interval = rly.get_interval_estimates(success, iqm_and_mean, reps=reps,
                                                 random_state=rng())  # fmt: skip
    table = {}
    for v in VARIANTS:
        rates = [r["comm_rate"] for r in runs[v]]
        table[v] = {
            "seeds": len(runs[v]),
            "iqm": [float(point[v][0]), *map(float, interval[v][:, 0])],
            "mean": [float(point[v][1]), *map(float, interval[v][:, 1])],
            "comm_rate": float(np.mean(rates)),
        }
    pairs = {
        "commformer,random": (success["commformer"], success["random"]),
        "commformer,full": (success["commformer"], success["full"]),
        "commformer_tg,commformer": (success["commformer_tg"], success["commformer"]),
    }
    improve, improve_ci = rly.get_interval_estimates(
        {"commformer,random": pairs["commformer,random"]}, metrics.probability_of_improvement,
        reps=reps, random_state=rng(),
    )  # fmt: skip

    def mean_difference(x, y):
        return np.array([metrics.aggregate_mean(x) - metrics.aggregate_mean(y)])

    diff, diff_ci = rly.get_interval_estimates(pairs, mean_difference, reps=reps,
                                               random_state=rng())  # fmt: skip

    def estimate(point, ci, key):
        return [float(np.ravel(point[key])[0]), *map(float, np.ravel(ci[key]))]

    rate_cut = 1 - table["commformer_tg"]["comm_rate"] / table["commformer"]["comm_rate"]
    claims = {
        "p_learned_beats_random": estimate(improve, improve_ci, "commformer,random"),
        "learned_minus_full": estimate(diff, diff_ci, "commformer,full"),
        "gated_minus_learned": estimate(diff, diff_ci, "commformer_tg,commformer"),
        "gated_rate_cut": float(rate_cut),
    }
    claims["holds"] = {
        # the paper's claims, each with 95% confidence
        "learned ~ full (not 5 points worse)": claims["learned_minus_full"][1] >= -0.05,
        "learned > random (P(improvement) > 0.5)": claims["p_learned_beats_random"][1] > 0.5,
        "gates cut >= 50% of messages within 5 points": bool(
            rate_cut >= 0.5 and claims["gated_minus_learned"][1] >= -0.05
        ),
    }
    return {"table": table, "claims": claims}


def markdown(name: str, summary: dict) -> str:
    """One task's interval table and its claims as markdown."""
    seeds, updates, episodes = summary["seeds"], summary["updates"], summary["eval_episodes"]
    lines = [
        f"**{name}**: seeds {seeds[0]}..{seeds[-1]} ({len(seeds)}), {updates} updates, "
        f"{episodes} evaluation episodes per run; success IQM and mean with 95% "
        "stratified-bootstrap intervals",
        "",
        "| variant | success IQM [95% CI] | success mean [95% CI] | comm rate |",
        "|---|---|---|---|",
    ]
    for v, row in summary["table"].items():
        iqm, mean = row["iqm"], row["mean"]
        lines.append(
            f"| {v} | {iqm[0]:.3f} [{iqm[1]:.3f}, {iqm[2]:.3f}] | "
            f"{mean[0]:.3f} [{mean[1]:.3f}, {mean[2]:.3f}] | {row['comm_rate']:.3f} |"
        )
    c = summary["claims"]

    def ci(x):
        return f"{x[0]:+.3f} [{x[1]:+.3f}, {x[2]:+.3f}]"

    p = c["p_learned_beats_random"]
    lines += [
        "",
        f"P(learned > random) = {p[0]:.3f} [{p[1]:.3f}, {p[2]:.3f}]; learned - full = "
        f"{ci(c['learned_minus_full'])}; gated - learned = {ci(c['gated_minus_learned'])} at "
        f"{c['gated_rate_cut']:.1%} fewer messages.",
        "Holds: " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in c["holds"].items()),
    ]
    return "\n".join(lines)


def reproduce(
    runs_dir: Path,
    jobs: int = 1,
    progress=None,
    seeds: int = 10,
    small: bool = False,
    tasks: tuple[str, ...] | None = None,
) -> Path:
    """Train (or reuse) every run of the table, then write ``reproduce/comm/tables.md|json``.

    ``small``: the reduced grid (module docstring), written to ``tables_small.md|json``.
    ``tasks``: only these tasks; the tables of other tasks already in the file are kept.
    """
    runs_dir = Path(runs_dir)
    out = runs_dir / "reproduce" / "comm"
    stem = "tables_small" if small else "tables"
    chosen = configs(seeds, jobs, small, tasks)
    tables = _earlier_tables(out / f"{stem}.json") if tasks is not None else {}
    rank = {n + ("-small" if small else ""): i for i, n in enumerate(TASK_NAMES)}  # table order
    for name, cfg in chosen:
        summary = compare(cfg, out / "runs" / name, progress)
        tables[name] = {
            "seeds": list(cfg.seeds),
            "updates": cfg.base.ppo.updates,
            "eval_episodes": cfg.eval_episodes,
            **interval_table(summary["runs"], reps=REPS),
            "runs": summary["runs"],
        }
        tables = dict(sorted(tables.items(), key=lambda item: rank.get(item[0], len(rank))))
        text = "\n\n".join(markdown(n, t) for n, t in tables.items()) + "\n"
        atomic_write_json(out / f"{stem}.json", tables)  # each finished task at once
        atomic_write_bytes(out / f"{stem}.md", text.encode())
    return out / f"{stem}.md"


def _earlier_tables(path: Path) -> dict:
    """The task tables an earlier ``reproduce`` wrote to ``path`` (none if there is no file)."""
    if not path.exists():
        return {}
    try:
        tables = read_json(path)
    except ValueError as error:
        raise ValueError(f"{error}; move it away to start anew") from None
    keys = {"seeds", "updates", "eval_episodes", "table", "claims"}
    if not isinstance(tables, dict) or not all(
        isinstance(t, dict) and keys <= t.keys() for t in tables.values()
    ):
        expected = f"task name -> table with {sorted(keys)}"
        raise ValueError(f"{path}: not a tables file (expected {expected})")
    return tables
