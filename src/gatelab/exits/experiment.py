"""Glue between data, backbone, features, checkpoints and evaluation for the ViT backbone.

``prepare`` loads the splits and the frozen backbone, wraps it with exits, measures the FLOPs of
every exit and caches every split's frozen features (keyed by the backbone file and the splits).
JEI-DNN checkpoints are ``<name>.safetensors`` (IM and gate weights) with ``<name>.json`` beside
them (kind, architecture, backbone path, training config, lambda).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from gatelab.exits.data import Split, SplitConfig, load_fashion_mnist, make_splits, normalise
from gatelab.exits.eval import (
    conformal_thresholds,
    gated_metrics,
    prediction_sets,
    reliability,
    set_metrics,
)
from gatelab.exits.inference import (
    ExitFlops,
    GatePolicy,
    exit_flops,
    run_early_exit,
    simulate_exits,
    time_pair,
)
from gatelab.exits.model import EarlyExitModel, vit_early_exit
from gatelab.exits.pretrain import load_backbone
from gatelab.exits.train import FeatureCache, TrainConfig, extract_features, train

EXITS_KIND = "gatelab.exits.jei-dnn"
CACHE_SPLITS = ("exits", "val", "calib", "test")


class Prepared(NamedTuple):
    """A wrapped backbone with its splits, cached features and per-exit FLOPs."""

    model: EarlyExitModel
    splits: dict[str, Split]
    caches: dict[str, FeatureCache]
    flops: ExitFlops
    transform: object
    backbone_path: Path


def _digest(path: Path, extra: str) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def prepare(
    backbone_path: Path,
    data_root: Path,
    split_cfg: SplitConfig | None = None,
    device: str = "cpu",
    cache_dir: Path | None = None,
    gate_context: bool = False,
    seed: int = 0,
) -> Prepared:
    """Load splits and the ViT backbone, count FLOPs per exit, cache each split's features.

    ``seed`` fixes the initialisation of the IMs and gates.
    """
    split_cfg = split_cfg or SplitConfig()
    vit, _ = load_backbone(backbone_path, device)
    torch.manual_seed(seed)
    model = vit_early_exit(vit, gate_context).to(device)
    splits = make_splits(load_fashion_mnist(data_root), split_cfg)
    flops = exit_flops(model, normalise(splits["test"].images[:1]).to(device))
    key = _digest(Path(backbone_path), json.dumps(dataclasses.asdict(split_cfg)))
    cache_file = None if cache_dir is None else Path(cache_dir) / f"features_{key}.pt"
    if cache_file is not None and cache_file.exists():
        saved = torch.load(cache_file, weights_only=True)
        caches = {k: FeatureCache(v["feats"], v["head"], v["labels"]) for k, v in saved.items()}
    else:
        caches = {
            name: extract_features(model, splits[name], normalise, device=device)
            for name in CACHE_SPLITS
        }
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    k: {"feats": c.feats, "head": c.head_logits, "labels": c.labels}
                    for k, c in caches.items()
                },
                cache_file,
            )
    return Prepared(model, splits, caches, flops, normalise, Path(backbone_path))


def save_exits(model: EarlyExitModel, path: Path, meta: dict) -> Path:
    """Write the IM and gate weights as safetensors and ``meta`` (+ kind, arch) beside them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(("ims.", "gates."))
    }
    save_file(state, path)
    full = {"kind": EXITS_KIND, "arch": model.arch, "n_exits": model.n_exits}
    full |= {"gate_context": model.gate_context} | meta
    path.with_suffix(".json").write_text(json.dumps(full, indent=2, default=str))
    return path


def read_exits_meta(path: Path) -> dict:
    """The JSON beside a JEI-DNN checkpoint; refuse anything that is not one."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if path.suffix != ".safetensors" or not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (expected a .safetensors file)")
    if not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint config {meta_path} not found beside {path.name}")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != EXITS_KIND:
        raise ValueError(
            f"{path} is not a JEI-DNN exits checkpoint (kind={meta.get('kind')!r}); "
            "train one with `gatelab exits train`"
        )
    return meta


def load_exits(model: EarlyExitModel, path: Path) -> dict:
    """Load IM and gate weights into ``model``; the architectures must match."""
    meta = read_exits_meta(path)
    if meta.get("arch") != model.arch or meta.get("n_exits") != model.n_exits:
        raise ValueError(
            f"{path} was trained for arch={meta.get('arch')!r} with {meta.get('n_exits')} exits, "
            f"but the backbone is arch={model.arch!r} with {model.n_exits} exits"
        )
    state = load_file(path)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(("ims.", "gates."))}
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if bad or set(state) - set(own):
        raise ValueError(
            f"{path}: weights do not match this architecture (first mismatch {bad[:1]})"
        )
    model.load_state_dict(state, strict=False)
    return meta


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


def train_checkpoint(
    backbone: Path, data_root: Path, out: Path, cfg: TrainConfig, progress=None
) -> dict:
    """Train JEI-DNN for ``cfg.lam`` on a ViT backbone; write ``out`` (+ .json) and a run folder.

    The run folder ``out`` without suffix holds ``config.json``, ``metrics.jsonl`` and the
    resumable ``train_ckpt.pt``.
    """
    prep = prepare(backbone, data_root, SplitConfig(), cfg.device, cache_dir=backbone.parent)
    run_dir = Path(out).with_suffix("")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    caches, cost = prep.caches, prep.flops.fraction
    metrics = train(prep.model, caches["exits"], caches["val"], cost, cfg, run_dir, progress)
    meta = {"lam": cfg.lam, "backbone": str(backbone), "train": dataclasses.asdict(cfg)}
    save_exits(prep.model, out, meta | {"metrics": metrics})
    return metrics


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
    read with their run folder (:func:`~gatelab.exits.effnet_run.prepare_efficientnet`).

    A sample leaves at the first exit whose hazard gate value reaches ``gate_threshold`` (the
    paper's 0.5 by default; the sweep reads every checkpoint at several, see ``curves.json``).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {alpha}")
    if not 0 < gate_threshold < 1:
        raise ValueError(f"--gate-threshold must be in (0, 1), got {gate_threshold}")
    meta = read_exits_meta(checkpoint)
    if meta.get("arch") == "efficientnet-lite0":
        from gatelab.exits.effnet_run import prepare_efficientnet  # it builds on this module

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
