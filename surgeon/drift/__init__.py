"""DRIFT: the reasoning prior Δ (``prior``), the statistics of how far two models are apart
(``distance``), and the gradient bias that uses Δ during fine-tuning (``bias``).
"""
