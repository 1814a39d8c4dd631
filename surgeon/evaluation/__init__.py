"""Measuring the reasoning tax: evaluation items from data rows and greedy completions
(``generate``), the answer in a text (``answers``), intervals and paired tests (``stats``),
``surgeon eval`` over several models and sets (``run``), and the monitor that evaluates during
training (``monitor``).
"""
