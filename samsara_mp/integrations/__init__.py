"""Integrations with process managers (gunicorn, uWSGI, Celery, RQ, multiprocessing) and
web frameworks (Django, Flask, ASGI).

Each process-manager module wires samsara_mp's lifecycle (who owns the
publisher, fork reset, shipping at worker exit) into one server's hooks; each
framework module makes the process's shared client from the framework's
settings (``_settings.py``) and, for ASGI, ships at the lifespan's shutdown.
None is imported by ``samsara_mp`` itself, so none of them is needed unless
it is used.
"""
