"""Integrations with process managers: gunicorn, uWSGI, Celery, multiprocessing.

Each module wires samsara_mp's lifecycle (who owns the publisher, fork reset,
shipping at worker exit) into one server's hooks; none is imported by
``samsara_mp`` itself, so none of them is needed unless it is used.
"""
