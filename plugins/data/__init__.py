"""Data sources: documents addressed by stable row indices.

Entry-point modules (each also the entry point's name): `ultrachat` (the reference corpus, hub or local copy), `local_corpora` (`text`: your
files, `embedded`: Python's own help topics), `synthetic` (a Markov chain with a known entropy rate).
"""
