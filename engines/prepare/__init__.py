"""``rapidserve prepare``: turn a PyTorch (or ONNX) model into optimized, validated, benchmarked
engines and write them as a model repository that ``rapidserve serve`` loads as it is.

The pipeline (``pipeline.py``): load the model and data (``source.py``, ``data.py``), build each
variant the recipe asks for (one module per kind of step: ``export.py``, ``ort_quant.py``,
``torch_quant.py``, ``pruning.py``, ``distill.py``, ``lowrank.py``, ``tensorrt.py``), measure its
fidelity against the original on the validation data (``fidelity.py``), benchmark it in this
process next to the original (``bench.py``), write the accepted ones (``repository.py``) and a
report (``report.py``). ``runners.py`` runs any of them on a batch; ``batching.py`` handles ONNX
files whose batch dimension is fixed; ``progress.py`` prints the step lines and turns failures into
one line each. ``demo.py`` trains a small digits CNN for ``rapidserve prepare --demo``.

Needs the ``torch`` extra (torch, torch-pruning, matplotlib, tqdm, PyYAML) plus ONNX Runtime.
"""

from rapidserve.engines.prepare.recipe import VARIANTS, Recipe

__all__ = ["VARIANTS", "Recipe"]
