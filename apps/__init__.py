"""apps: the Gradio comparison app (extra ``app``): ``fastgen app`` or ``python -m apps.app``; see :mod:`apps.app`."""
