"""Not the library's face: ``surgeon demo`` (``pipeline``), the tiny real models it and the tests
build (``tiny``), a synthetic dataset (``synthetic``) and a local stand-in of the Hub (``hub_standin``).
"""

from surgeon._compat import forward

__getattr__ = forward(__name__, "pipeline")
