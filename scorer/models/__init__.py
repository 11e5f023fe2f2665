"""The model that ships inside fxscore (default.onnx), and the sha256 this release pins for it.

The loader refuses a packaged default whose bytes do not hash to DEFAULT_SHA256: a damaged or
modified installation must not score silently. Replacing default.onnx means updating this pin
(and MODEL_CARD.md, which quotes the model id, its first 12 hex digits).
"""
DEFAULT_SHA256 = "77bfe169eae4cb2cedad25a39841573dd991763e5a0f2593a505ab7e2f5f80f0"
