"""``cggr demo``: train a small GPT with and without CGGR and compare (issue: the main job).

``data`` builds the corpus and BPE tokenizer, ``model`` is a plain-PyTorch GPT, ``train``
runs the arms (full loss, CGGR, random selection) and writes the table, plot and JSON.
"""
