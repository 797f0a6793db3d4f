"""Django: put ``"samsara_mp.integrations.django"`` in ``INSTALLED_APPS``.

The app's :class:`~samsara_mp.integrations.django.apps.SamsaraMPConfig`
configures the process's shared client from the ``SAMSARA_MP`` setting (a dict
of the same keys as ``SamsaraClient``) in ``AppConfig.ready()``; views record
with ``samsara_mp.get_client().record_event(...)``. A bad value stops Django's
start with ``ImproperlyConfigured`` naming the key. Works under gunicorn with
and without ``--preload`` (a preload master makes the client, which starts no
thread, and each forked worker gets its own state) and under ``manage.py
runserver``, whose autoreloader child inherits the settings exported by the
parent.
"""
