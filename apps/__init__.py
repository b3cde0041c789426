"""apps: the Gradio comparison app (extra ``app``): ``fastgen app`` or ``python -m fastgen.apps.app``; see :mod:`apps.app`."""
