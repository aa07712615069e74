"""flasktop: top for Flask under gunicorn."""

__version__ = "0.1.0"
