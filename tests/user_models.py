"""A user's own architecture, named to the runners as `user_models:small_convnet` (a factory on PYTHONPATH; pytest
puts tests/ there). Its head is called `classifier`, and it has one BatchNorm2d and one GroupNorm."""

from torch import nn


def small_convnet(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


NOT_A_FACTORY = 3
