"""Image classifiers: the digits CNN, CIFAR ResNets/WRNs, ImageNet ResNets,
their BN layers, and the PyTorch checkpoint converter."""
