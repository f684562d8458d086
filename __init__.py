"""moonforge: train a Kimi-VL-style vision-language model through its whole lifecycle.

The repository root is the `moonforge` package (see pyproject's package-dir): `flows`, `registry`,
`stages` and `model` import as `moonforge.<folder>`, with dependencies pointing one way
(flows -> registry -> stages -> model).
"""

__version__ = "0.1.0"
