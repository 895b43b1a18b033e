"""lrk's Hydra sweeper on Optuna >= 4 (``defaults: [override /hydra/sweeper: lrk_optuna]``).

Hydra finds this package through the ``hydra_plugins`` namespace (which has no ``__init__.py``).
"""
