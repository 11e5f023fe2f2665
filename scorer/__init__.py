"""fxscore: bone-fracture classification of X-rays, scored with onnxruntime (no PyTorch needed).

Nothing reachable from `import fxscore` may import torch: hospital batch jobs run the scorer
without it. Training and export live in `fxscore.train` and `fxscore.export`.
"""
__version__ = "0.1.0"
