"""Reply jobs: one per acknowledged question, until its answer is stored (see base.py)."""
