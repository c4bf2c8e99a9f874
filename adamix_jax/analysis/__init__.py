"""Analyses of finished runs: who pays for privacy (issue #13).

``isolation``: how isolated each example is in feature space; ``report``:
the per-example table, the figures and their numbers; ``stage``: the stage
runner's 'analysis' stage. Individual epsilons (``privacy.individual``)
depend on the private data and are not releasable: everything here is for
the data owner.
"""
