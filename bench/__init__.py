"""The performance harness: ``make bench`` runs ``bench/run.py``.

Every target is a ratio taken within one run (ours against C xenstored, or ours at two tree
sizes), never a timed test.
"""
