"""apps: the Gradio comparison app (extra ``app``): ``fastgen app``; see :mod:`apps.app`."""
