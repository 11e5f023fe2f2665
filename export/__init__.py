"""fxscore.export: best checkpoint -> ONNX with the fxscore contract embedded (needs fxscore[train])."""
