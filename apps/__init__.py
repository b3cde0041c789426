"""apps: the Gradio comparison app (extra ``app``; in progress, issue 10)."""
