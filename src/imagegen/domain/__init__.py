"""Plain values and rules, without I/O: models, errors (the IMG codes), validation,
prices, plans, plan-limit/credit/quota decisions (limits.py, credits.py), templates.
Imports nothing of imagegen outside domain/ (checked by import-linter)."""
