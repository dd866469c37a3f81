"""Data sources: documents addressed by stable row indices.

Entry-point modules (each also the entry point's name): `ultrachat` (the reference corpus, from the
hub or a local copy), `local_corpora` (`text`: your files; `embedded`: Python's own help topics),
`synthetic` (a seeded Markov chain whose entropy rate is known).
"""
