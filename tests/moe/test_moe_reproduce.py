import dataclasses

from test_moe_train import TINY, _cfg

from gatelab.moe import reproduce
from gatelab.moe.train import quick_configs
from gatelab.runs import read_checkpoint_metadata


def test_configurations_are_the_documented_commands():
    configs = reproduce.configurations()
    model, quick = quick_configs(True)
    assert configs["moe-train-quick"] == (model, quick)  # gatelab moe train --quick
    assert configs["moe-train-quick-800"] == (model, dataclasses.replace(quick, steps=800))
    assert (quick.steps, quick.eval_every, quick.checkpoint_every, quick.seed) == (600, 200, 400, 0)


def test_reproduce_on_tiny_runs_writes_tables_and_never_retrains(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, steps=6, eval_every=3, log_every=3, checkpoint_every=3)
    tiny = {"a": (TINY, cfg), "b": (TINY, dataclasses.replace(cfg, steps=8))}
    monkeypatch.setattr(reproduce, "configurations", lambda: tiny)
    ticks = []
    path = reproduce.reproduce(tmp_path, progress=lambda d, t: ticks.append((d, t)))
    assert path == tmp_path / "reproduce" / "moe" / "tables.md"
    text = path.read_text()
    assert "| 6 |" in text and "| 8 |" in text and ticks[-1] == (28, 28)
    ckpt = tmp_path / "b" / "moe" / "checkpoint.safetensors"
    stamp = ckpt.stat().st_mtime_ns
    ticks.clear()
    assert (
        reproduce.reproduce(tmp_path, progress=lambda d, t: ticks.append((d, t))).read_text()
        == text
    )
    assert ckpt.stat().st_mtime_ns == stamp and not ticks  # resumed at the end: nothing retrained
    assert read_checkpoint_metadata(ckpt)["step"] == "8"
