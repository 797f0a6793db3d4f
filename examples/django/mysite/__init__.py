"""A one-view Django project that records events with samsara_mp."""
