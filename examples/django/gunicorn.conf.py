"""gunicorn settings for the Django example: the master owns the publisher.

With ``preload_app`` Django's settings are read in the master, before
``on_starting`` starts the publisher, so SAMSARA_MP configures the publisher
and every worker alike (the client made there starts no thread).
"""

from samsara_mp.integrations import gunicorn as samsara

wsgi_app = "mysite.wsgi"
workers = 2
preload_app = True  # ready() runs in the master: SAMSARA_MP reaches on_starting
control_socket_disable = True

on_starting = samsara.on_starting
on_exit = samsara.on_exit
worker_exit = samsara.worker_exit
post_fork = samsara.post_fork
