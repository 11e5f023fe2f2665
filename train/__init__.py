"""fxscore.train: fit torchvision's ResNet18 on labelled X-ray folders (needs fxscore[train])."""
