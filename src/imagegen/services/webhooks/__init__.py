"""Signed webhooks (Standard Webhooks): a job's callback from the unit of work that ends
it to the receiver.

- outbox.py    the one call the job-ending units of work make (pipeline.py's end of a
               job, reads.py's cancel of a queued one): the callback row, if the job
               named a callback_uri.
- delivery.py  the callback URL's check at submit, and one delivery attempt: the body
               (the Generation as the API shows it), the signature, the POST through the
               fetch guard, the record of the attempt and the time of the next one.
- secrets.py   each user's `whsec_...` secret: read (made on first use), rotate
               (idempotent, with a grace period), and the keys that sign now.
jobs/webhooks.py claims due callbacks on every replica and runs delivery.py on them.
"""
