"""Empirical privacy audit with one training run (Steinke et al., 2023).

``bounds``: the p-value and the epsilon lower bound; ``canaries``: crafted
feature-space canaries, their scores and the guesses; ``run``: the audit of
the AdaMix private stage (and of a deliberately broken variant).
"""
