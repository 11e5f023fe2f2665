"""The fxscore command line: a thin click layer over the library modules.

Command docstrings are the help. Library functions return data; only this module prints.
Exit codes (all commands): 0 success; 1 fatal error (missing model, bad input folder, ...);
2 usage error; 3 the job finished but some files could not be read (see the error column).
"""
from __future__ import annotations

import click

from . import __version__

EXIT_SOME_FAILED = 3
TRAIN_HINT = 'this command needs PyTorch: pip install "fxscore[train]"'


def require_torch_stage(stage: str):
    """Import fxscore.<stage> lazily; without torch, tell the user how to get it."""
    import importlib

    try:
        return importlib.import_module(f"fxscore.{stage}")
    except ImportError as e:
        if getattr(e, "name", "") in ("torch", "torchvision", "onnx") or "torch" in str(e):
            raise click.ClickException(f"{TRAIN_HINT} ({e})") from e
        raise


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fxscore")
def cli() -> None:
    """Bone-fracture classification of X-rays.

    \b
    fxscore run ./xrays --out preds.csv      score a folder tree (no PyTorch needed)
    fxscore eval ./test --report out/        evaluate on labelled folders
    fxscore audit ./data                     find train/test leakage and shortcuts
    fxscore split ./data --out ./clean       make a leak-free split
    fxscore train ./data --out runs/r18      train ResNet18  (needs fxscore[train])
    fxscore export runs/r18/best.pt --out model.onnx          (needs fxscore[train])
    """


# ---- run ----------------------------------------------------------------------------------

# ---- eval ---------------------------------------------------------------------------------

# ---- audit / split ------------------------------------------------------------------------

# ---- train --------------------------------------------------------------------------------

# ---- export -------------------------------------------------------------------------------
