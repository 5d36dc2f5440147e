"""Fault, load and security scenarios against the processes ``make up`` starts.

They run in ``make test-resilience`` (``.ci/run`` runs it after ``make test``), marked
``@pytest.mark.resilience``; the Reliability issue fills this folder as services land.
"""
