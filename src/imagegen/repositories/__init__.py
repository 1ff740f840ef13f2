"""asyncpg repositories, one module per aggregate: the only place with SQL.

They read and write rows and return domain values (and facts such as counts and
balances); what those mean for a caller is decided in services/ and domain/.
unit_of_work.py gives a transaction per multi-statement write.
"""
