"""PyTorch reference architectures for the conversion tests and step timings.

Written for the conversion tests with the originals' module names, so their
state dicts have the keys of the released checkpoints:

- `WideResNet`: RobustBench `model_zoo/architectures/wide_resnet.py`
  (`Standard`): pre-activation blocks whose 1x1 `convShortcut` reads the
  activated input, final `bn1`, 8x8 average pooling, `fc`.
- `ResNetCifar`: TTT `models/ResNet.py`: a 16-channel stem for every width,
  pre-activation blocks, a parameter-free shortcut (average pooling, then
  zero channels appended), final `bn`, `fc`.
- `ResNet`: torchvision `models/resnet.py` (V1.5: the stride sits on the 3x3
  convolution of the bottleneck), `downsample = Sequential(conv1x1, bn)`.

Inputs are NCHW and already normalised: callers apply the mean/std that
the tta_jax models apply internally.
"""

from tta_jax.torch_reference import INSTALL_HINT

try:
  import torch
except ModuleNotFoundError as e:  # the optional `torch` extra
  raise ModuleNotFoundError(f'{e}: {INSTALL_HINT}', name=e.name) from e
import torch.nn.functional as F
from torch import nn


def _conv3x3(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class WideBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = _conv3x3(cin, cout, stride)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = _conv3x3(cout, cout)
    self.equal = cin == cout
    if not self.equal:
      self.convShortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

  def forward(self, x):
    o = F.relu(self.bn1(x))
    shortcut = x if self.equal else self.convShortcut(o)
    o = self.conv2(F.relu(self.bn2(self.conv1(o))))
    return shortcut + o


class WideStage(nn.Module):
  def __init__(self, n, cin, cout, stride):
    super().__init__()
    self.layer = nn.Sequential(
      *[
        WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
        for i in range(n)
      ]
    )

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  def __init__(self, depth=28, widen_factor=10, num_classes=10):
    super().__init__()
    n = (depth - 4) // 6
    w = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    self.conv1 = _conv3x3(3, 16)
    self.block1 = WideStage(n, 16, w[0], 1)
    self.block2 = WideStage(n, w[0], w[1], 2)
    self.block3 = WideStage(n, w[1], w[2], 2)
    self.bn1 = nn.BatchNorm2d(w[2])
    self.fc = nn.Linear(w[2], num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    x = F.avg_pool2d(F.relu(self.bn1(x)), 8)
    return self.fc(x.flatten(1))


class PreActBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = _conv3x3(cin, cout, stride)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = _conv3x3(cout, cout)
    self.stride, self.expand = stride, cout // cin
    self.pad = stride != 1 or cin != cout

  def forward(self, x):
    o = self.conv1(F.relu(self.bn1(x)))
    o = self.conv2(F.relu(self.bn2(o)))
    if self.pad:
      x = F.avg_pool2d(x, self.stride)
      x = torch.cat([x] + [torch.zeros_like(x)] * (self.expand - 1), 1)
    return x + o


class ResNetCifar(nn.Module):
  def __init__(self, depth=26, width=1, num_classes=10):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = _conv3x3(3, 16)
    cin = 16
    for s, ch in enumerate((16 * width, 32 * width, 64 * width)):
      blocks = []
      for i in range(n):
        stride = 2 if (s > 0 and i == 0) else 1
        blocks.append(PreActBlock(cin, ch, stride))
        cin = ch
      setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))
    self.bn = nn.BatchNorm2d(cin)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.conv1(x)
    x = self.layer3(self.layer2(self.layer1(x)))
    x = F.avg_pool2d(F.relu(self.bn(x)), 8)
    return self.fc(x.flatten(1))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = _conv3x3(cin, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = _downsample(cin, planes, stride)

  def forward(self, x):
    o = F.relu(self.bn1(self.conv1(x)))
    o = self.bn2(self.conv2(o))
    return F.relu(o + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)
    self.downsample = _downsample(cin, 4 * planes, stride)

  def forward(self, x):
    o = F.relu(self.bn1(self.conv1(x)))
    o = F.relu(self.bn2(self.conv2(o)))
    o = self.bn3(self.conv3(o))
    return F.relu(o + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin, cout, stride):
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(
    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
  )


class ResNet(nn.Module):
  def __init__(self, block, stage_sizes, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for s, n in enumerate(stage_sizes):
      blocks = []
      for i in range(n):
        stride = 2 if (s > 0 and i == 0) else 1
        blocks.append(block(cin, 64 * 2**s, stride))
        cin = 64 * 2**s * block.expansion
      setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes=1000):
  return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes=1000):
  return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
  """Random weights AND BN running statistics, in place (deterministic).

  Convolutions keep a He-scaled normal init so deep random nets stay well
  conditioned; BN scales/biases and running mean/var are drawn away from
  their trivial values so any mix-up in the conversion shows in the logits.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, nn.Linear):
        m.weight.normal_(0.0, m.in_features**-0.5, generator=g)
        m.bias.normal_(0.0, 0.1, generator=g)
  return model
