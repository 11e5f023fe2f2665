"""The model that ships inside fxscore (default.onnx), and the sha256 this release pins for it.

The loader refuses a packaged default whose bytes do not hash to DEFAULT_SHA256: a damaged or
modified installation must not score silently. Replacing default.onnx means updating this pin
(and MODEL_CARD.md, which quotes the model id, its first 12 hex digits).
"""
DEFAULT_SHA256 = "d75d0f68f49db9224db740cc7a50d8ccd26705e3368d3ee310d5588b4169a68c"
