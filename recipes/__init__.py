"""FAIR-Calib and baseline W4A4 recipes, installed as ``fair_calib_llmc.recipes``.

Name one by its file stem (``fair-calib-llmc quantize --recipe fair_calib_w4a4``,
``fair_calib_llmc.quantize(..., "fair_calib_w4a4", ...)``) or pass a path to your own copy.
Former names keep loading as aliases (``fair_calib_llmc.recipe.RECIPE_ALIASES``).
This file only makes the folder a package, so the wheel and editable installs find the YAML
files with ``importlib.resources``.
"""
