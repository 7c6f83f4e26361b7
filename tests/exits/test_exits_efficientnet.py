import torch

from gatelab.exits.efficientnet import efficientnet_early_exit, fmnist_to_effnet, load_lite0


def test_stage_split_reproduces_the_pretrained_network():
    net = load_lite0(32)
    model = efficientnet_early_exit(32, n_classes=1000, net=net)
    model.head.fc.load_state_dict(net._fc.state_dict())
    assert [len(stage.blocks) for stage in model.blocks] == [1, 2, 2, 3, 3, 4, 1]
    x = fmnist_to_effnet(torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8), 32)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(model.backbone_forward(x), net(x))
        assert model.all_exit_logits(x).shape == (7, 2, 1000)
    assert not any(p.requires_grad for p in model.blocks.parameters())
