"""A minimal Django project for tests/test_frameworks.py (settings, urls and wsgi in one package)."""
