"""Stored draws: denoised draws ``D(x + delta)`` computed once and reused, for certification
(the rank stage, the proxy, the test set) and for training.

:mod:`~cadis.draws.keys` says what draws depend on and where a store of them lives;
:mod:`~cadis.draws.folder` how a store is laid out on disk and the one locked way it is
built; :mod:`~cadis.draws.certification_store` and :mod:`~cadis.draws.training_store` the
two kinds of store. "Store" in cadis means such a folder of stored draws, nothing else.
"""
