"""The model: backbones (torchvision or timm) with fastai's head, the model as one value (`ModelSpec`), the
record of what the network sees (`Preprocessing`) and checkpoints."""
