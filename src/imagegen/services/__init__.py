"""The use cases: each module (or the generations/ package) orchestrates one area and
reaches the outside only through ports (Database and UnitOfWork in unit_of_work.py,
BlobStore, Provider, SignedBlobFiles). Servicers in api/ call these and nothing below
them; server.py builds them.

- generations/  submit, the pipeline a worker runs, watch, get/list/cancel, settings
- library.py    the image library;  templates.py  prompt templates
- usage.py      credit balance, usage records, stats, exports
- sources.py    edit sources (URL, data: URL, bytes, library image) before a job exists
"""
