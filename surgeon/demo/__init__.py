"""Not the library's face: ``surgeon demo`` (``pipeline``), the tiny real models it and the tests
build (``tiny``, ``tokenizer``), a synthetic dataset (``synthetic``) and a local stand-in of the
Hub (``hub_standin``, ``hub_repos``).
"""
