"""fxscore.train: fit torchvision's ResNet18 on labelled X-ray folders (needs fxscore[train]).

config    TrainConfig, every option of a run (saved as config.json)
data      folder layout checks, data fingerprint, one decode pass, keyed augmentation views
presets   training augmentation and the evaluation transform (= the scorer's preprocess)
model     resnet18 with a one-logit head; imagenet / none / local weights; freezing
features  the frozen-backbone feature cache
engine    train_one_epoch, evaluate, fit: checkpoints, resume, early stopping, history

This package file imports nothing, so the torch-free modules (config, presets) stay usable
without torch; `fxscore.train.engine` is the entry point that needs it.
"""
