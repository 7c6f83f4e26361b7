r"""Metrics of gated predictions (accuracy, FLOPs, ECE, conformal sets) and :func:`evaluate`.

- :func:`expected_calibration_error`: 15 equal-width confidence bins over the *whole* test set
  (the authors' public code averaged per-batch ECEs).
- :func:`conformal_thresholds`: split conformal with score :math:`s = 1 - \hat p(y)`, one
  threshold per exit from the calibration samples that left there, the finite-sample quantile
  :math:`\hat q = s_{(\lceil (n+1)(1-\alpha) \rceil)}`, and the pooled threshold for exits with
  fewer than ``min_count`` calibration samples. Because the same gate decides the exit on the
  calibration and test splits, exchangeability holds within each exit and
  :math:`P(y \in C(x)) \ge 1 - \alpha` (Vovk et al. 2005; Angelopoulos & Bates 2021,
  arXiv:2107.07511 §1).
- :func:`evaluate`: real batched early exit of a prepared backbone on the test split, timed
  against the plain backbone, with these metrics; :func:`evaluate_checkpoint` does it for a
  saved JEI-DNN checkpoint (ViT or EfficientNet-Lite0), as ``gatelab exits eval``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

from gatelab.exits.backbones import (
    Prepared,
    load_exits,
    prepare,
    prepare_efficientnet,
    read_exits_meta,
)
from gatelab.exits.data import SplitConfig
from gatelab.exits.inference import GatePolicy, run_early_exit, simulate_exits, time_pair


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15):
    r"""ECE, equal-width bins: :math:`\sum_b \frac{|B_b|}{N} |\mathrm{acc}_b - \mathrm{conf}_b|`.

    Confidence is the top probability; bin ``b`` holds confidences in ``((b-1)/n_bins, b/n_bins]``.

    Shape:
        probs ``(N, C)``, labels ``(N,)`` -> float.
    """
    return reliability(probs, labels, n_bins).ece


class Reliability(NamedTuple):
    """Per-bin counts, mean confidence and accuracy ``(n_bins,)``, and the ECE."""

    counts: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    ece: float


def reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> Reliability:
    """The reliability diagram's data (see :func:`expected_calibration_error`)."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).to(probs.dtype)
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1  # (N,) in [0, n_bins)
    counts = torch.bincount(bins, minlength=n_bins).to(probs.dtype)
    conf_sum = torch.zeros(n_bins, dtype=probs.dtype).index_add_(0, bins, conf)
    acc_sum = torch.zeros(n_bins, dtype=probs.dtype).index_add_(0, bins, correct)
    safe = counts.clamp_min(1)
    gap = (acc_sum - conf_sum).abs().sum() / len(labels)
    return Reliability(counts, conf_sum / safe, acc_sum / safe, float(gap))


def conformal_quantile(scores: torch.Tensor, alpha: float) -> float:
    r"""Finite-sample split-conformal threshold :math:`s_{(\lceil (n+1)(1-\alpha)\rceil)}`.

    Returns ``inf`` (every class in the set) when :math:`\lceil (n+1)(1-\alpha)\rceil > n`.
    """
    _check_alpha(alpha)
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return math.inf
    return float(scores.sort().values[rank - 1])


def conformal_thresholds(
    scores: torch.Tensor, exit_index: torch.Tensor, n_exits: int, alpha: float, min_count: int = 50
) -> torch.Tensor:
    r"""One threshold per exit, the pooled threshold where an exit has < ``min_count`` samples.

    ``min_count`` is raised to :math:`\lceil 1/\alpha \rceil - 1` so a per-exit quantile is
    always finite.

    Shape:
        scores, exit_index ``(N,)`` -> thresholds ``(L,)``.
    """
    _check_alpha(alpha)
    min_count = max(min_count, math.ceil(1 / alpha) - 1)
    pooled = conformal_quantile(scores, alpha)
    out = torch.full((n_exits,), pooled, dtype=torch.float64)
    for ell in range(n_exits):
        mine = scores[exit_index == ell]
        if len(mine) >= min_count:
            out[ell] = conformal_quantile(mine, alpha)
    return out


def prediction_sets(
    probs: torch.Tensor, exit_index: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor:
    """Sets ``{y : 1 - p(y) <= q_exit}`` as a boolean mask ``(N, C)``."""
    q = thresholds.to(probs.device, torch.float64)[exit_index]  # (N,)
    return (1 - probs.double()) <= q[:, None]


class SetMetrics(NamedTuple):
    """Empirical coverage and mean set size of conformal sets."""

    coverage: float
    mean_set_size: float


def set_metrics(sets: torch.Tensor, labels: torch.Tensor) -> SetMetrics:
    """Coverage ``P(y in C)`` and mean ``|C|`` of boolean sets ``(N, C)``."""
    covered = sets[torch.arange(len(labels)), labels].double().mean()
    return SetMetrics(float(covered), float(sets.sum(-1).double().mean()))


def gated_metrics(
    logits: torch.Tensor,
    exit_index: torch.Tensor,
    labels: torch.Tensor,
    cost: torch.Tensor,
    n_exits: int,
) -> dict:
    """Accuracy, FLOPs fraction, ECE and exit histogram of gated predictions."""
    probs = logits.double().softmax(-1)
    hist = torch.bincount(exit_index, minlength=n_exits)
    return {
        "accuracy": float((logits.argmax(-1) == labels).double().mean()),
        "flops_fraction": float(cost.double()[exit_index].mean()),
        "ece": expected_calibration_error(probs, labels),
        "exit_histogram": [int(c) for c in hist],
    }


def evaluate(
    prep: Prepared,
    alpha: float = 0.05,
    batch_size: int = 256,
    repeats: int = 3,
    n_timed: int | None = None,
    policy=None,
    time_it: bool = True,
) -> dict:
    """Real early exit on the test split, timed against the plain backbone; ECE; conformal sets.

    Args:
        prep: output of :func:`prepare`, with trained IMs and gates in ``prep.model``.
        alpha: conformal miscoverage level in (0, 1).
        batch_size: inference batch size for the real early exit and the backbone timing.
        repeats: timing repeats (the median is kept).
        n_timed: time only the first ``n_timed`` test images (``None``: all of them).
        policy: exit rule; JEI-DNN's gates by default.
        time_it: measure wall-clock (``seconds``/``speedup`` are ``None`` otherwise, as with
            ``repeats=0``).

    Returns:
        The flat metrics the CLI writes.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    model, test = prep.model.eval(), prep.splits["test"]
    policy = policy if policy is not None else GatePolicy(model.gates)
    device = next(model.parameters()).device
    images = prep.transform(test.images)
    batches = [images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size)]
    outs = [run_early_exit(model, b, policy) for b in batches]
    logits = torch.cat([o.logits for o in outs]).cpu()
    exit_index = torch.cat([o.exit_index for o in outs]).cpu()
    cost = prep.flops.fraction
    metrics = gated_metrics(logits, exit_index, test.labels, cost, model.n_exits)
    # timing: same batches, same batch size, median of repeats
    timed = batches if n_timed is None else batches[: max(1, -(-n_timed // batch_size))]
    t_exit = t_full = None
    if time_it and repeats > 0:
        exit_fn = lambda b: run_early_exit(model, b, policy)  # noqa: E731
        t_exit, t_full = time_pair(exit_fn, model.backbone_forward, timed, repeats)
    # conformal: thresholds from the calibration split's gated exits
    calib = prep.caches["calib"]
    with torch.no_grad():
        cal_logits = model.logits_from_features(
            [f.to(device) for f in calib.feats], calib.head_logits.to(device)
        )
        cal = simulate_exits(cal_logits, policy)
    cal_probs = cal.logits.double().softmax(-1).cpu()
    scores = 1 - cal_probs[torch.arange(len(calib.labels)), calib.labels]
    thresholds = conformal_thresholds(scores, cal.exit_index.cpu(), model.n_exits, alpha)
    sets = prediction_sets(logits.double().softmax(-1), exit_index, thresholds)
    coverage, size = set_metrics(sets, test.labels)
    rel = reliability(logits.double().softmax(-1), test.labels)
    return metrics | {
        "seconds": t_exit,
        "speedup": None if t_exit is None else t_full / t_exit,  # same batches, alternated
        "coverage": coverage,
        "mean_set_size": size,
        "alpha": alpha,
        "backbone_seconds": t_full,
        "backbone_accuracy": float(
            (prep.caches["test"].head_logits.argmax(-1) == test.labels).double().mean()
        ),
        "timed_images": sum(len(b) for b in timed),
        "batch_size": batch_size,
        "reliability": {
            "counts": rel.counts.tolist(),
            "confidence": rel.confidence.tolist(),
            "accuracy": rel.accuracy.tolist(),
        },
    }


EVAL_KEYS = (
    "accuracy",
    "flops_fraction",
    "seconds",
    "speedup",
    "ece",
    "coverage",
    "mean_set_size",
    "exit_histogram",
)


def evaluate_checkpoint(
    checkpoint: Path,
    data_root: Path,
    alpha: float = 0.05,
    batch_size: int = 256,
    repeats: int = 3,
    backbone: Path | None = None,
    device: str = "cpu",
    gate_threshold: float = 0.5,
) -> dict:
    """:func:`evaluate` a JEI-DNN checkpoint; the flat keys ``EVAL_KEYS`` of the issue.

    ViT checkpoints name their backbone (``backbone`` overrides it); EfficientNet-Lite0 ones are
    read with their run folder (:func:`~gatelab.exits.backbones.prepare_efficientnet`).

    A sample leaves at the first exit whose hazard gate value reaches ``gate_threshold`` (the
    paper's 0.5 by default; the sweep reads every checkpoint at several, see ``curves.json``).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {alpha}")
    if not 0 < gate_threshold < 1:
        raise ValueError(f"--gate-threshold must be in (0, 1), got {gate_threshold}")
    meta = read_exits_meta(checkpoint)
    if meta.get("arch") == "efficientnet-lite0":
        prep = prepare_efficientnet(Path(checkpoint).parent, data_root)
        prep = prep._replace(model=prep.model.to(device))
    elif meta.get("arch") == "vit":
        backbone = Path(backbone or meta["backbone"])
        context = bool(meta.get("gate_context", False))
        prep = prepare(backbone, data_root, SplitConfig(), device, backbone.parent, context)
    else:
        raise ValueError(
            f"{checkpoint} holds exits for arch={meta.get('arch')!r}; "
            "`gatelab exits eval` evaluates 'vit' and 'efficientnet-lite0' checkpoints"
        )
    load_exits(prep.model, checkpoint)
    policy = GatePolicy(prep.model.gates, gate_threshold)
    metrics = evaluate(prep, alpha, batch_size, repeats, policy=policy)
    return {k: metrics[k] for k in EVAL_KEYS}
