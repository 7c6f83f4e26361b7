import pytest
import torch

from gatelab.exits import ViT, ViTConfig, vit_early_exit


@pytest.fixture
def tiny_exit_model():
    """A 4-block ViT on 8x8 inputs with exits, float64, random but seeded."""
    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=8, patch_size=4, d_model=8, n_heads=2, n_blocks=4, mlp_ratio=2, n_classes=5
    )
    model = vit_early_exit(ViT(cfg)).double()
    return model


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: one thread avoids thread spin-waits on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_sweep():
    """``tiny_sweep(n_timed, warmup_epochs, phase_steps)``: a two-lambda, two-threshold sweep."""
    from gatelab.exits import TrainConfig
    from gatelab.exits.sweep import SweepConfig

    def make(n_timed: int = 50, warmup_epochs: int = 2, phase_steps: int = 3) -> SweepConfig:
        return SweepConfig(
            lams=(0.05, 1.0),
            gate_thresholds=(0.3, 0.6),
            n_timed=n_timed,
            repeats=1,
            max_baseline_points=4,
            train=TrainConfig(
                warmup_epochs=warmup_epochs, n_rounds=1, phase_steps=phase_steps, batch_size=32
            ),
        )

    return make
